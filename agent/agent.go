// Package agent is the Edgefleet edge agent: it keeps an MQTT session with
// the controller, converges the models it runs to the desired state it is
// sent, serves them on a local Open Inference Protocol endpoint, and
// spools every inference outcome to SQLite until the controller has it.
//
// The pieces live in sub-packages, cut by what they do: link (MQTT
// session), deploy (reconcile, downloads, activation), fetch (resumable
// bundle downloads), spool (SQLite telemetry buffer), telemetry (batches
// and acks), localapi (the HTTP endpoint). This package wires them
// together and owns their goroutines.
//
// Start-up order matters: the agent restores its models from disk and
// opens its local endpoint before it connects anywhere, so apps on the
// device are served even when the network is down.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgefleet/edgefleet/agent/deploy"
	"github.com/edgefleet/edgefleet/agent/internal/memtrim"
	"github.com/edgefleet/edgefleet/agent/link"
	"github.com/edgefleet/edgefleet/agent/localapi"
	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/agent/telemetry"
	"github.com/edgefleet/edgefleet/agent/update"
	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/models/tensor"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"golang.org/x/sync/errgroup"
	"google.golang.org/protobuf/proto"
)

// Version is the agent's version, set at build time with
// -ldflags "-X github.com/edgefleet/edgefleet/agent.Version=1.2.3".
var Version = "0.1.0-dev"

// Capabilities are announced in Hello.
//
//	health-watch  watches a new version and rolls it back locally (HealthPolicy)
//	shadow        can run a candidate in shadow before its switch
//
// Hello also carries telemetry-zstd (wire.CapabilityTelemetryZstd) unless
// --telemetry-compression is off: the agent sends compressed batches.
var Capabilities = []string{"oip-v2", "telemetry-spool", "health-watch", "shadow"}

// SpoolFile is the spool's file name in the data directory.
const SpoolFile = "spool.db"

// CacheDir is the wazero compilation cache's directory in the data directory.
const CacheDir = "cache"

// Options are the knobs of Run that are not user configuration: injected
// dependencies and timings tests shrink. Zero values are the defaults.
type Options struct {
	Logger *slog.Logger
	// Loader loads model bundles. Nil means a wazero host (Host, or one
	// made with its compilation cache under DATA/cache). The fleet
	// simulator passes one Loader to every agent, which dedupes loaded
	// models by bundle digest.
	Loader Loader
	// Host runs the models when Loader is nil; nil makes one. Run does
	// not close a Host it was given.
	Host *host.Host
	// Spool buffers telemetry; nil opens DATA/spool.db (spool.SQLite).
	// The fleet simulator passes a spool.Memory. Run does not close it.
	Spool Spool
	// Dial replaces the network dialer of the MQTT link.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Listener serves the local endpoint instead of one on cfg.Listen.
	Listener net.Listener
	// Guard checks bundles (signatures) and versions (the version floor)
	// before they load; nil builds one from the config's keys
	// (deploy.TrustGuard, or deploy.AllowAll when none is configured).
	Guard deploy.Guard
	// NoListener runs the agent without a local HTTP endpoint (cfg.Listen
	// is ignored); callers use (*Agent).Infer or (*Agent).Handler
	// in-process, as the fleet simulator does.
	NoListener bool
	// Ready, if set, is called once the agent serves its restored models
	// (before it connects), with the local endpoint's address ("" with
	// NoListener).
	Ready func(addr string)
	// MinBackoff and MaxBackoff bound the MQTT reconnect delay (1s, 60s).
	MinBackoff, MaxBackoff time.Duration
	// RetryMin and RetryMax bound the retry delay of a failed download (2s, 5m).
	RetryMin, RetryMax time.Duration
	// AckTimeout is how long a telemetry batch waits for its ack (10s).
	AckTimeout time.Duration
	// StateInterval is how often the spool depth is re-reported if it changed (10s).
	StateInterval time.Duration
	// WatchSaveInterval is how often the counts of a running health watch
	// are saved to state.json (5s); a simulator of many agents may save
	// less often.
	WatchSaveInterval time.Duration
	// Executable is the path of this agent's binary. Set (fleet-agent's
	// main sets it), it turns on self-update (agent/update): the binary is
	// replaced by the agent release the desired state names, and Run
	// returns ErrRestart for main to re-execute it. Empty (embedded
	// agents, the simulator): agent releases are ignored.
	Executable string
	// RestartTrace, if set, times a self-update's restart: Run marks its
	// start-up and shutdown steps in it, and logs it at the first answer
	// after an exec (see selfupdate.go). Nil: nothing is timed.
	RestartTrace *update.Trace
	// TrimIdle, if positive, gives memory the process does not use back to
	// the system once the agent has had no inference and no deployment
	// change for this long (agent/internal/memtrim). The trim is
	// process-wide: fleet-agent sets it from Config.TrimAfter; a process
	// that embeds agents (the simulator) leaves it zero.
	TrimIdle time.Duration
}

// ErrRestart is returned by Run when the agent's binary was replaced by a
// new release: the caller re-executes it (update.Exec).
var ErrRestart = update.ErrRestart

// Loader loads model bundles for the agent (see deploy.Loader).
type Loader = deploy.Loader

// Model is one loaded model version (see deploy.Model).
type Model = deploy.Model

// Result is one answered inference (see deploy.Result).
type Result = deploy.Result

// Spool is the telemetry buffer the agent appends to and sends from;
// spool.SQLite and spool.Memory are Spools.
type Spool interface {
	telemetry.Spool
	spool.Appender
	Stats(ctx context.Context) (spool.Stats, error)
}

// Run runs an agent until ctx ends: New, then (*Agent).Run.
func Run(ctx context.Context, cfg Config, o Options) error {
	a, err := New(cfg, o)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// Agent is one edge agent. Make it with New, run it once with Run; Infer
// and Handler serve its models in-process, also while it runs.
type Agent struct {
	cfg  Config
	o    Options
	log  *slog.Logger
	mgr  *deploy.Manager
	own  *ownHost // the host Run makes when Options has neither Loader nor Host
	api  *localapi.Server
	used atomic.Bool

	// Set by Run before anything reads them.
	spool  Spool
	queue  atomic.Pointer[spool.Queue]
	sender *telemetry.Sender
	link   *link.Link

	upd       *update.Updater // nil without Options.Executable
	traceOpen atomic.Bool     // a restart trace waits for the first answer
	statePoke chan struct{}
	cmds      chan *pb.Command
	// agg folds inferences into interval aggregates (records.go); set by
	// Run.
	agg                     atomic.Pointer[telemetry.Aggregator]
	samples, samplesSkipped atomic.Uint64
	guard                   deploy.Guard
	rot                     *keyRotation
	trim                    *memtrim.Trimmer // nil unless Options.TrimIdle

	mu       sync.Mutex
	lastSent *pb.ReportedState
}

// New checks cfg and returns an agent that has not started: Run opens the
// data directory, restores the models and connects.
func New(cfg Config, o Options) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.StateInterval <= 0 {
		o.StateInterval = 10 * time.Second
	}
	a := &Agent{cfg: cfg, o: o, log: o.Logger.With("device", cfg.ID), statePoke: make(chan struct{}, 1), cmds: make(chan *pb.Command, 16), rot: newKeyRotation()}
	a.trim = memtrim.New(o.TrimIdle, a.log)
	loader := o.Loader
	if loader == nil && o.Host != nil {
		loader = deploy.HostLoader(o.Host)
	}
	if loader == nil {
		a.own = &ownHost{}
		loader = a.own
	}
	guard := o.Guard
	if guard == nil {
		var err error
		if guard, err = guardFor(cfg, a.log); err != nil {
			return nil, err
		}
	}
	a.guard = guard
	var err error
	a.mgr, err = deploy.New(deploy.Options{
		DeviceID: cfg.ID, DataDir: cfg.Data, Loader: loader, Controller: cfg.Controller, Logger: o.Logger,
		Reporter: a, RetryMin: o.RetryMin, RetryMax: o.RetryMax,
		Health: cfg.Health.policy(), Shadow: cfg.Shadow.hook(), Guard: guard, SaveInterval: o.WatchSaveInterval,
	})
	if err != nil {
		return nil, err
	}
	a.api = localapi.New(localapi.Options{Models: apiModels{a}, Logger: a.log, Metrics: a.writeMetrics})
	if o.Executable != "" {
		if a.upd, err = newUpdater(cfg, o, a); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// ownHost is the Loader of an agent that makes its own host in Run.
type ownHost struct{ h *host.Host }

func (o *ownHost) Load(ctx context.Context, b *bundle.Bundle) (deploy.Model, error) {
	if o.h == nil {
		return nil, errors.New("agent: the model host is not running")
	}
	return deploy.HostLoader(o.h).Load(ctx, b)
}

// ID returns the agent's device id.
func (a *Agent) ID() string { return a.cfg.ID }

// Infer runs in on the active model serving name (a model name, or else a
// slot name) and records the outcome for telemetry and the health watch,
// exactly as a call to the local endpoint does. An unknown name is an
// error wrapping deploy.ErrNoModel.
func (a *Agent) Infer(ctx context.Context, name string, in []tensor.Tensor) (Result, error) {
	return a.infer(ctx, name, "", in)
}

func (a *Agent) infer(ctx context.Context, name, version string, in []tensor.Tensor) (Result, error) {
	at := time.Now()
	res, err := a.mgr.Infer(ctx, name, version, in)
	if errors.Is(err, deploy.ErrNoModel) {
		return res, err
	}
	if err == nil && a.traceOpen.Load() {
		a.traceAnswered()
	}
	a.recordInference(at, res, in, err)
	a.trim.Busy()
	return res, err
}

// Handler returns the local endpoint's HTTP handler (the OIP v2 API and
// /metrics), for callers that serve it themselves or call it in-process.
func (a *Agent) Handler() http.Handler { return a.api.Handler() }

// Slots returns what runs in each slot, as the agent reports it.
func (a *Agent) Slots() []*pb.SlotState { return a.mgr.Slots() }

// Generation returns the generation of the last accepted desired state.
func (a *Agent) Generation() uint64 { return a.mgr.Generation() }

// apiModels is what the local endpoint serves: the agent's models, with
// every inference recorded.
type apiModels struct{ a *Agent }

func (m apiModels) Infer(ctx context.Context, name, version string, in []tensor.Tensor) (deploy.Result, error) {
	return m.a.infer(ctx, name, version, in)
}

func (m apiModels) Manifest(name string) (*bundle.Manifest, bool) { return m.a.mgr.Manifest(name) }
func (m apiModels) Ready() bool                                   { return m.a.mgr.Ready() }

// Run runs the agent until ctx ends, then shuts down cleanly: it stops
// accepting requests, flushes the spool queue, says offline, and closes
// the models and the spool. An Agent runs once.
func (a *Agent) Run(ctx context.Context) error {
	if a.used.Swap(true) {
		return errors.New("agent: Run called twice; make a new Agent with New")
	}
	cfg, o, log := a.cfg, a.o, a.log
	if err := os.MkdirAll(cfg.Data, 0o755); err != nil {
		return fmt.Errorf("data directory %s: %w; set --data to a writable directory", cfg.Data, err)
	}

	// The spool, the host and the models (restored from disk) come up
	// together (selfupdate.go: they stand between a self-update's exec
	// and its first answer), and are closed together, after everything
	// that may call them.
	db, err := a.openParts(ctx)
	defer a.closeParts(context.WithoutCancel(ctx), db)
	if err != nil {
		return err
	}

	a.link, err = link.New(link.Options{
		Broker: cfg.Broker, DeviceID: cfg.ID, Logger: o.Logger, Dial: o.Dial,
		TLSCert: cfg.TLSCert, TLSKey: cfg.TLSKey, TLSCA: cfg.TLSCA,
		MinBackoff: o.MinBackoff, MaxBackoff: o.MaxBackoff,
		Handle:       a.handle,
		OnConnect:    a.onConnect,
		OnDisconnect: func() { a.sender.Disconnected() },
	})
	if err != nil {
		return err
	}
	compression, _ := telemetry.ParseCompression(cfg.TelemetryCompression) // checked by Validate
	a.sender = telemetry.New(telemetry.Options{Spool: a.spool, Publisher: a.link, Logger: log, AckTimeout: o.AckTimeout, Compression: compression})
	queue := spool.NewQueue(a.spool, spool.QueueOptions{Logger: log, Flushed: a.sender.Poke})
	a.queue.Store(queue)

	g, gctx := errgroup.WithContext(ctx)
	addr := ""
	if !o.NoListener {
		ln := o.Listener
		if ln == nil {
			ln, err = net.Listen("tcp", cfg.Listen)
			if err != nil {
				return fmt.Errorf("listen on %s: %w; is another agent running? set --listen to a free address", cfg.Listen, err)
			}
		}
		addr = ln.Addr().String()
		srv := &http.Server{Handler: a.api.Handler(), ReadHeaderTimeout: 10 * time.Second, ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
		a.traceServing()
		g.Go(func() error {
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				return fmt.Errorf("local endpoint: %w", err)
			}
			return nil
		})
		g.Go(func() error {
			<-gctx.Done()
			a.traceStopping()
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			err := srv.Shutdown(sctx)
			o.RestartTrace.Mark(update.StepServingStopped)
			return err
		})
	}
	o.Logger.Info("agent ready", "id", cfg.ID, "listen", addr, "version", Version, "models_active", a.mgr.Ready())
	if o.Ready != nil {
		o.Ready(addr)
	}
	// The queue outlives the aggregator, which closes the open interval
	// when it stops: that last aggregate must still reach the spool.
	agg := a.newAggregator()
	a.agg.Store(agg)
	qctx, qcancel := context.WithCancel(context.WithoutCancel(gctx))
	defer qcancel()
	g.Go(func() error { return queue.Run(qctx) })
	g.Go(func() error { defer qcancel(); return agg.Run(gctx) })
	g.Go(func() error { return a.sender.Run(gctx) })
	g.Go(func() error { return a.mgr.Run(gctx) })
	g.Go(func() error { return a.link.Run(gctx) })
	g.Go(func() error { return a.reportLoop(gctx, o.StateInterval) })
	g.Go(func() error { return a.commandLoop(gctx) })
	if a.upd != nil {
		a.offerRelease()
		g.Go(func() error {
			err := a.upd.Run(gctx)
			if errors.Is(err, update.ErrRestart) {
				o.RestartTrace.Mark(update.StepRestartOrdered)
			}
			return err
		})
	}
	g.Go(func() error { return a.keysLoop(gctx) })
	g.Go(func() error { return a.trim.Run(gctx) })
	err = g.Wait()
	o.RestartTrace.Mark(update.StepStopped)
	log.Info("agent stopped")
	return err
}

// handle routes a message from the controller. It runs on the MQTT
// client's goroutine and hands everything on without blocking.
func (a *Agent) handle(kind wire.Kind, env *pb.Envelope) {
	switch kind {
	case wire.KindDesired:
		a.mgr.Offer(env.GetDesired())
	case wire.KindAck:
		a.sender.Ack(env.GetAck())
	case wire.KindKeys:
		a.offerKeys(env.GetKeys())
	case wire.KindCmd:
		select {
		case a.cmds <- env.GetCommand():
		default:
			a.log.Warn("command dropped: too many waiting", "command", env.GetCommand().GetName())
		}
	}
}

// onConnect says hello and the current state on every (re)connect, then
// lets the sender resend what is unacknowledged.
func (a *Agent) onConnect(ctx context.Context) {
	a.sayHello(ctx)
	a.sender.Connected()
}

func (a *Agent) sayHello(ctx context.Context) {
	st := a.state(ctx)
	hello := &pb.Hello{
		Labels: a.cfg.Labels, AgentVersion: Version, AbiVersions: slices.Clone(host.SupportedABIs),
		Capabilities: a.capabilities(), State: st, Os: runtime.GOOS, Arch: runtime.GOARCH,
	}
	if a.upd != nil {
		hello.Capabilities = append(hello.Capabilities, "selfupdate")
		hello.AgentUpdate = st.GetAgentUpdate()
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := a.link.Publish(pctx, wire.KindHello, hello); err != nil {
		a.log.Warn("hello not sent", "err", err)
		return
	}
	if a.publishState(pctx, st) && a.upd != nil {
		// Connected and reported: the healthy marker of a new version.
		a.upd.Connected()
	}
}

// Event publishes a deployment event, or spools it when offline so the
// controller still learns of it through telemetry.
func (a *Agent) Event(ctx context.Context, ev *pb.Event) {
	a.trim.Busy()
	if a.queue.Load() == nil {
		a.log.Warn("event before the agent runs; dropped", "kind", ev.GetKind())
		return
	}
	if a.link.Connected() {
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		err := a.link.Publish(pctx, wire.KindEvents, ev)
		cancel()
		if err == nil {
			return
		}
		a.log.Debug("event not published; spooling it", "kind", ev.GetKind(), "err", err)
	}
	a.record(&pb.TelemetryRecord{Body: &pb.TelemetryRecord_Event{Event: ev}})
}

// StateChanged schedules a state report. It never blocks.
func (a *Agent) StateChanged() {
	a.trim.Busy()
	a.offerRelease()
	select {
	case a.statePoke <- struct{}{}:
	default:
	}
}

// record queues a telemetry record; before Run has opened the spool
// there is nowhere to put it, and it is dropped.
func (a *Agent) record(rec *pb.TelemetryRecord) {
	if q := a.queue.Load(); q != nil {
		q.Add(rec)
	}
}

// state builds the ReportedState from the parts.
func (a *Agent) state(ctx context.Context) *pb.ReportedState {
	st := &pb.ReportedState{
		Slots:             a.mgr.Slots(),
		DesiredGeneration: a.mgr.Generation(),
		AgentVersion:      Version,
		RecentErrors:      a.mgr.RecentErrors(),
	}
	if a.upd != nil {
		st.AgentUpdate = a.upd.State()
	}
	if ss, err := a.spool.Stats(ctx); err == nil {
		st.SpoolDepth, st.SpoolDropped = ss.Depth, ss.Dropped
		st.SpoolDroppedByClass = droppedByClass(ss, a.queue.Load())
	}
	if q := a.queue.Load(); q != nil {
		st.SpoolDropped += q.Dropped()
	}
	st.Health = pb.Health_HEALTH_OK
	for _, s := range st.Slots {
		if s.GetLastError() != "" {
			st.Health = pb.Health_HEALTH_DEGRADED
		}
	}
	// A slot still converging (the first model downloading, say) serves
	// nothing yet but is on its way: degraded. Failing is for a desired
	// slot the agent gave up on: only the controller can fix that.
	switch converging, failed := a.mgr.Unserved(); {
	case failed > 0:
		st.Health = pb.Health_HEALTH_FAILING
	case converging > 0:
		st.Health = pb.Health_HEALTH_DEGRADED
	}
	return st
}

func (a *Agent) publishState(ctx context.Context, st *pb.ReportedState) bool {
	if err := a.link.Publish(ctx, wire.KindState, st); err != nil {
		a.log.Debug("state not published", "err", err)
		return false
	}
	a.mu.Lock()
	a.lastSent = st
	a.mu.Unlock()
	return true
}

// reportLoop publishes the state when something changed, and re-checks it
// every interval, so the spool depth stays current without a message per
// inference.
func (a *Agent) reportLoop(ctx context.Context, interval time.Duration) error {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-a.statePoke:
		case <-t.C:
		}
		if !a.link.Connected() {
			continue // onConnect reports the state anyway
		}
		st := a.state(ctx)
		a.mu.Lock()
		same := a.lastSent != nil && proto.Equal(a.lastSent, st)
		a.mu.Unlock()
		if same {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		a.publishState(pctx, st)
		cancel()
	}
}

// commandLoop runs the controller's ad-hoc commands.
func (a *Agent) commandLoop(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case c := <-a.cmds:
			a.log.Info("command", "id", c.GetId(), "name", c.GetName())
			switch c.GetName() {
			case "resync":
				a.sayHello(ctx)
				a.sender.Connected()
			case "diagnostics":
				pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				a.publishState(pctx, a.state(ctx))
				cancel()
			default:
				a.log.Warn("unknown command ignored", "id", c.GetId(), "name", c.GetName())
			}
		}
	}
}

// writeMetrics adds the link, spool, telemetry and deployment metrics to
// the endpoint's /metrics.
func (a *Agent) writeMetrics(w io.Writer) {
	q := a.queue.Load()
	if q == nil {
		return // not running yet
	}
	b2i := func(b bool) int {
		if b {
			return 1
		}
		return 0
	}
	ls := a.link.Stats()
	ts := a.sender.Stats()
	ss, _ := a.spool.Stats(context.Background())
	metric := func(name, typ, help string, v any) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s %v\n", name, help, name, typ, name, v)
	}
	fmt.Fprintf(w, "# HELP edgefleet_agent_info The agent's version.\n# TYPE edgefleet_agent_info gauge\nedgefleet_agent_info{version=%q,device=%q} 1\n", Version, a.cfg.ID)
	metric("edgefleet_agent_mqtt_connected", "gauge", "1 while connected to the broker.", b2i(ls.Connected))
	metric("edgefleet_agent_mqtt_connects_total", "counter", "Successful broker connections.", ls.Connects)
	metric("edgefleet_agent_mqtt_malformed_total", "counter", "Messages dropped as malformed.", ls.Malformed)
	metric("edgefleet_agent_mqtt_oversized_total", "counter", "Messages dropped unread for being over wire.MaxPayload (counted in malformed too).", ls.Oversized)
	metric("edgefleet_agent_spool_depth", "gauge", "Records waiting in the spool.", ss.Depth)
	metric("edgefleet_agent_spool_dropped_total", "counter", "Records dropped by the spool bound or a full queue.", ss.Dropped+q.Dropped())
	metric("edgefleet_agent_telemetry_batches_total", "counter", "Telemetry batches published, resends included.", ts.Batches)
	metric("edgefleet_agent_telemetry_resent_total", "counter", "Telemetry batches resent after an ack timeout.", ts.Resent)
	metric("edgefleet_agent_telemetry_acked_total", "counter", "Records deleted after the controller's ack.", ts.Acked)
	metric("edgefleet_agent_desired_generation", "gauge", "Generation of the last accepted desired state.", a.mgr.Generation())
	a.writeTelemetryMetrics(w, ss, q)
	a.writeActivationMetrics(w)
	a.writeKeyMetrics(w)
}
