// Package sim is the fleet simulator: many real Edgefleet agents in one
// process, for scale tests, benchmarks and demos (`fleet sim`).
//
// Every simulated device runs the real agent code (agent.New and Run:
// MQTT link, reconcile, downloads, activation and health watch, spool,
// telemetry sender), against a real broker and a real controller. What
// the simulator shares is what can be shared without changing behaviour:
//
//   - one wazero host, so a module compiles once for the whole fleet;
//   - one loaded model per bundle digest (a shared agent.Loader), so ten
//     thousand devices running the same bundle cost one instance pool;
//   - an in-memory spool per device (spool.Memory, which passes the same
//     conformance tests as the SQLite spool) instead of a database file.
//
// Each device still has its own data directory (desired state, state.json,
// its downloaded bundles) and downloads its own copy of every bundle from
// the controller, as a device does; by default the directories are on
// tmpfs, so ten thousand devices are not measuring one shared disk.
//
// What it adds are the knobs of a real fleet: label distributions
// (ParseLabels), inference traffic (Options.Rate), devices that are
// offline (Options.Offline, Agent.SetOnline), power cuts (Agent.PowerOff),
// devices whose model fails (Options.Failing, FailRate, FailModel), and
// network delay and loss (Options.Network: a dialer whose connections are
// shaped). The simulator watches each device's MQTT traffic (a framer on
// its connection, no decoding) to count messages and to know when a device
// has joined: when the broker acknowledged its first state report.
//
// A test or a tool makes a Sim with New, runs it with Run, and steers it
// through its Agents:
//
//	s, err := sim.New(sim.Options{Agents: 200, Broker: broker, Controller: api,
//		Offline: 0.2, Failing: 0.3, FailRate: 0.3, FailModel: "grid-anomaly@1.1.0"})
//	go s.Run(ctx)
//	s.WaitJoined(ctx) // every device the controller should know has reported
//	s.Agent("sim-007").SetOnline(true)
//	s.Stats().Running["grid-anomaly@1.1.0"]
//
// Memory: a device costs about 210 KiB of heap when idle (BenchmarkJoin:
// its goroutines, its paho client and the agent's queues) and about
// 290 KiB of resident memory running a model (BENCHMARKS.md has the
// current figures and where they go), so 10,000 devices need about 3 GB,
// and one open file each (Run raises the soft limit as far as the hard
// one).
package sim

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edgefleet/edgefleet/agent"
	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/models/host"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// Defaults for zero Options fields.
const (
	DefaultIDPrefix        = "sim-"
	DefaultStartRate       = 1000 // agents started per second
	DefaultSpoolMaxRecords = 10_000
	// DefaultMaxBackoff caps the agents' reconnect delay. The agent's own
	// default (60s) is right for a device; a simulated outage is short and
	// tests wait for the devices to come back.
	DefaultMaxBackoff = 5 * time.Second
	// MaxAgents bounds one simulator process.
	MaxAgents = 100_000
)

// Options configure a Sim. Agents, Broker and Controller are required.
type Options struct {
	// Agents is how many devices to simulate.
	Agents int
	// Broker is the MQTT broker every agent connects to (tcp://host:port).
	Broker string
	// Controller is the controller's base URL; agents download bundles
	// from it.
	Controller string
	// IDPrefix starts every device id; ids are the prefix and the device's
	// number, zero-padded to the width of Agents (sim-00001 ...). Default
	// DefaultIDPrefix.
	IDPrefix string
	// Labels gives the devices their labels (see ParseLabels).
	Labels Labels
	// Seed makes the labels and the choice of offline and failing devices
	// reproducible. Zero is a seed like any other.
	Seed uint64

	// Rate is how many inferences per second each device runs on its
	// active model (Poisson arrivals; 0: none). Devices keep inferring
	// while offline, as real ones do, and spool the outcomes.
	Rate float64

	// Offline is the fraction of devices that are offline. They connect
	// once, say hello and report their state (so the controller knows
	// them), then lose their network until SetOnline(true). With
	// NeverSeen they never connect at all.
	Offline   float64
	NeverSeen bool

	// Failing is the fraction of devices whose model fails; FailRate is
	// the fraction of their inferences that fail (default 1). FailModel
	// limits the failures to one model or model version ("name" or
	// "name@version"), e.g. the version a rollout brings.
	Failing   float64
	FailRate  float64
	FailModel FailSpec

	// Network shapes every device's connection to the broker.
	Network Network

	// DataDir holds the devices' data directories (DataDir/<id>): desired
	// state, state.json and downloaded bundles. Empty means a new
	// temporary directory, on tmpfs (/dev/shm) when there is one, removed
	// when Run returns: ten thousand devices each fsyncing their files
	// would otherwise measure one shared disk rather than the fleet.
	DataDir string

	// StartRate is how many devices start (and so connect) per second, so
	// the broker is not hit by every CONNECT at once (default
	// DefaultStartRate).
	StartRate float64

	// SpoolMaxRecords bounds each device's in-memory spool (default
	// DefaultSpoolMaxRecords).
	SpoolMaxRecords uint64

	// ReleaseKeys and DirectorKeys are the public key files every device
	// pins (agent.Config.ReleaseKeys and DirectorKeys): the release keys
	// that sign bundles and the controller's director key
	// (DATA/keys/director.pub) that signs desired states. A device
	// without both refuses to start unless AllowUnsigned is set.
	ReleaseKeys, DirectorKeys []string
	// AllowUnsigned is the agents' --allow-unsigned (development only):
	// with no key, devices check no signature at all; with one, they
	// accept unsigned documents of the other kind.
	AllowUnsigned bool

	// Configure, if set, adjusts each device's agent configuration before
	// the device starts: health watch defaults, shadow phase, TLS. The
	// simulator has set the id, data directory, labels, broker,
	// controller, spool bound and keys.
	Configure func(a *Agent, cfg *agent.Config)

	// Host runs the models; nil makes one with an in-memory compilation
	// cache, closed when Run returns.
	Host *host.Host

	// Logger receives the simulator's own logs; AgentLogger the agents'
	// (default: discarded; ten thousand agents are loud).
	Logger, AgentLogger *slog.Logger

	// Agent timings (zero: the agent's defaults, except MaxBackoff which
	// defaults to DefaultMaxBackoff).
	MinBackoff, MaxBackoff time.Duration
	RetryMin, RetryMax     time.Duration
	AckTimeout             time.Duration
	StateInterval          time.Duration
}

// Validate checks the options.
func (o *Options) Validate() error {
	var errs []error
	if o.Agents < 1 || o.Agents > MaxAgents {
		errs = append(errs, fmt.Errorf("agents %d: want 1 to %d", o.Agents, MaxAgents))
	}
	if o.Broker == "" {
		errs = append(errs, errors.New("broker: set the MQTT broker URL, e.g. tcp://127.0.0.1:1883"))
	}
	if o.Controller == "" {
		errs = append(errs, errors.New("controller: set the controller URL, e.g. http://127.0.0.1:8080"))
	}
	for name, f := range map[string]float64{"offline": o.Offline, "failing": o.Failing, "fail rate": o.FailRate} {
		if !(f >= 0 && f <= 1) {
			errs = append(errs, fmt.Errorf("%s fraction %v: want a number from 0 to 1", name, f))
		}
	}
	if !(o.Rate >= 0 && o.Rate <= 1000) {
		errs = append(errs, fmt.Errorf("rate %v: want 0 to 1000 inferences per second per device", o.Rate))
	}
	if o.StartRate < 0 {
		errs = append(errs, fmt.Errorf("start rate %v: must not be negative", o.StartRate))
	}
	if o.FailModel != "" {
		name, version, hasVersion := strings.Cut(string(o.FailModel), "@")
		if name == "" || (hasVersion && version == "") {
			errs = append(errs, fmt.Errorf("fail model %q: want a model name or name@version", o.FailModel))
		}
	}
	if err := o.Network.Validate(); err != nil {
		errs = append(errs, err)
	}
	if o.IDPrefix != "" {
		if err := wire.ValidateDeviceID(o.IDPrefix + "1"); err != nil {
			errs = append(errs, fmt.Errorf("id prefix %q: %w", o.IDPrefix, err))
		}
	}
	// Every device reads the key files when it starts; a bad one is
	// better reported once, now, than by ten thousand devices that stay
	// off.
	if !o.AllowUnsigned && (len(o.ReleaseKeys) == 0 || len(o.DirectorKeys) == 0) {
		errs = append(errs, errors.New("keys: give every device a release key and the controller's director key (fleet sim --release-key FILE --director-key FILE), or allow unsigned (--allow-unsigned, development only)"))
	}
	for _, f := range append(slices.Clone(o.ReleaseKeys), o.DirectorKeys...) {
		if _, err := trust.ReadPublicKey(f); err != nil {
			errs = append(errs, fmt.Errorf("key %s: %w", f, err))
		}
	}
	return errors.Join(errs...)
}

// Sim is a simulated fleet. Make it with New and run it once with Run.
type Sim struct {
	o      Options
	log    *slog.Logger
	agents []*Agent
	byID   map[string]*Agent
	models atomic.Pointer[models] // set by Run
	dial   *dialer
	// expectJoin is how many devices say hello by themselves: all but
	// the NeverSeen offline ones.
	expectJoin int

	started chan struct{} // closed once every device has been started
	used    atomic.Bool
	dataDir atomic.Pointer[string]

	// Fleet-wide counters; the per-device states are counted in Stats.
	stats struct {
		connects, published, received atomic.Uint64
		inferences, errors            atomic.Uint64
	}
}

// New checks the options and lays out the fleet: ids, labels, which
// devices are offline and which fail. Nothing runs until Run.
func New(o Options) (*Sim, error) {
	if err := o.Validate(); err != nil {
		return nil, fmt.Errorf("sim: %w", err)
	}
	if o.IDPrefix == "" {
		o.IDPrefix = DefaultIDPrefix
	}
	if o.StartRate == 0 {
		o.StartRate = DefaultStartRate
	}
	if o.SpoolMaxRecords == 0 {
		o.SpoolMaxRecords = DefaultSpoolMaxRecords
	}
	if o.Failing > 0 && o.FailRate == 0 {
		o.FailRate = 1
	}
	if o.MaxBackoff == 0 {
		o.MaxBackoff = DefaultMaxBackoff
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.AgentLogger == nil {
		o.AgentLogger = slog.New(slog.DiscardHandler)
	}
	s := &Sim{
		o: o, log: o.Logger, byID: make(map[string]*Agent, o.Agents),
		dial: &dialer{nw: o.Network}, started: make(chan struct{}),
	}
	labels := o.Labels.Assign(o.Agents, o.Seed)
	offline := pick(o.Agents, o.Offline, o.Seed, 1001)
	failing := pick(o.Agents, o.Failing, o.Seed, 1002)
	width := len(fmt.Sprint(o.Agents))
	for i := range o.Agents {
		a := &Agent{
			ID:      fmt.Sprintf("%s%0*d", o.IDPrefix, width, i+1),
			Labels:  labels[i],
			sim:     s,
			failing: failing[i],
			offline: offline[i],
			conns:   map[*conn]bool{},
			powerCh: make(chan struct{}, 1),
			// One spool for the device's life: it stands for the spool
			// file that survives a power cut.
			spool: spool.NewMemory(o.SpoolMaxRecords),
		}
		if err := wire.ValidateDeviceID(a.ID); err != nil {
			return nil, fmt.Errorf("sim: device id %s: %w; choose a shorter --prefix", a.ID, err)
		}
		a.power.Store(true)
		a.online.Store(!a.offline || !o.NeverSeen)
		if !a.offline || !o.NeverSeen {
			s.expectJoin++
		}
		s.agents = append(s.agents, a)
		s.byID[a.ID] = a
	}
	return s, nil
}

// Agents returns every simulated device, in id order.
func (s *Sim) Agents() []*Agent { return slices.Clone(s.agents) }

// Agent returns the device with that id, or nil.
func (s *Sim) Agent(id string) *Agent { return s.byID[id] }

// Started is closed once Run has started every device.
func (s *Sim) Started() <-chan struct{} { return s.started }

// DataDir returns the directory holding the devices' data, once Run has
// made it ("" before).
func (s *Sim) DataDir() string {
	if p := s.dataDir.Load(); p != nil {
		return *p
	}
	return ""
}

// Run starts the devices (StartRate a second), drives their inferences,
// and runs until ctx ends; then it stops every device cleanly (each says
// offline), waits for them, and returns nil. It fails only when the fleet
// cannot be set up (file limits, data directory).
func (s *Sim) Run(ctx context.Context) error {
	if s.used.Swap(true) {
		return errors.New("sim: Run called twice; make a new Sim with New")
	}
	if err := ensureFileLimit(s.o.Agents); err != nil {
		return fmt.Errorf("sim: %w", err)
	}
	dir := s.o.DataDir
	if dir == "" {
		base := ""
		if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
			base = "/dev/shm"
		}
		d, err := os.MkdirTemp(base, "edgefleet-sim-")
		if err != nil {
			return fmt.Errorf("sim: data directory: %w; set a writable DataDir (--data)", err)
		}
		defer os.RemoveAll(d)
		dir = d
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("sim: data directory %s: %w; set a writable DataDir (--data)", dir, err)
	}
	s.dataDir.Store(&dir)

	h := s.o.Host
	if h == nil {
		var err error
		h, err = host.New(ctx, host.Options{Logger: s.log})
		if err != nil {
			return fmt.Errorf("sim: %w", err)
		}
		defer h.Close(context.WithoutCancel(ctx))
	}
	s.models.Store(newModels(h))

	s.log.Info("simulated fleet starting", "agents", s.o.Agents, "broker", s.o.Broker, "controller", s.o.Controller,
		"data", dir, "offline", s.o.Offline, "failing", s.o.Failing, "rate", s.o.Rate)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.drive(ctx)
	}()
	interval := time.Duration(float64(time.Second) / s.o.StartRate)
	next := time.Now()
	for _, a := range s.agents {
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.supervise(ctx, dir)
		}()
		next = next.Add(interval)
		if d := time.Until(next); d > time.Millisecond {
			select {
			case <-ctx.Done():
			case <-time.After(d):
			}
		}
	}
	close(s.started)
	<-ctx.Done()
	wg.Wait()
	s.log.Info("simulated fleet stopped", "agents", s.o.Agents)
	return nil
}

// WaitJoined waits until every device that connects by itself (all but
// the NeverSeen offline ones) has reported its state to the broker at
// least once, or ctx ends.
func (s *Sim) WaitJoined(ctx context.Context) error {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		n := s.joined()
		if n >= s.expectJoin {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("sim: %d of %d devices joined: %w", n, s.expectJoin, ctx.Err())
		case <-t.C:
		}
	}
}

func (s *Sim) joined() int {
	n := 0
	for _, a := range s.agents {
		if a.joined.Load() {
			n++
		}
	}
	return n
}

// Stats is a snapshot of the simulated fleet.
type Stats struct {
	Agents int `json:"agents"`
	// Powered devices run their agent; Online ones have a network;
	// Connected ones have a broker session now; Joined ones have reported
	// their state at least once.
	Powered   int `json:"powered"`
	Online    int `json:"online"`
	Connected int `json:"connected"`
	Joined    int `json:"joined"`
	Failing   int `json:"failing"`
	// Connects counts broker connections opened.
	Connects uint64 `json:"connects"`
	// Published and Received count MQTT PUBLISH packets the devices sent
	// and got.
	Published uint64 `json:"published"`
	Received  uint64 `json:"received"`
	// Inferences counts inferences the simulator made on active models;
	// InferenceErrors those that failed.
	Inferences      uint64 `json:"inferences"`
	InferenceErrors uint64 `json:"inferenceErrors"`
	// ModelsLoaded is how many distinct bundles are loaded now;
	// ModelLoads how many loads the shared host has done in all.
	ModelsLoaded int    `json:"modelsLoaded"`
	ModelLoads   uint64 `json:"modelLoads"`
	// Running counts the powered devices by the model version active in
	// their slots ("name@version"; a device with two slots counts twice).
	Running map[string]int `json:"running"`
}

// Stats returns the fleet's counters now.
func (s *Sim) Stats() Stats {
	st := Stats{
		Agents:          len(s.agents),
		Connects:        s.stats.connects.Load(),
		Published:       s.stats.published.Load(),
		Received:        s.stats.received.Load(),
		Inferences:      s.stats.inferences.Load(),
		InferenceErrors: s.stats.errors.Load(),
	}
	st.Running = map[string]int{}
	now := time.Now()
	for _, a := range s.agents {
		for _, m := range a.runningNow(now) {
			st.Running[m]++
		}
		for _, c := range []struct {
			n  *int
			on bool
		}{{&st.Failing, a.failing}, {&st.Powered, a.Powered()}, {&st.Online, a.Online()}, {&st.Joined, a.Joined()}, {&st.Connected, a.Connected()}} {
			if c.on {
				*c.n++
			}
		}
	}
	if ms := s.models.Load(); ms != nil {
		st.ModelsLoaded = ms.loaded()
		st.ModelLoads = ms.loads.Load()
	}
	return st
}

// agentOptions are the agent.Options of one device.
func (s *Sim) agentOptions(a *Agent) agent.Options {
	return agent.Options{
		Logger:        s.o.AgentLogger,
		Loader:        loader{ms: s.models.Load(), a: a},
		Spool:         a.spool,
		Dial:          a.dialBroker,
		NoListener:    true,
		MinBackoff:    s.o.MinBackoff,
		MaxBackoff:    s.o.MaxBackoff,
		RetryMin:      s.o.RetryMin,
		RetryMax:      s.o.RetryMax,
		AckTimeout:    s.o.AckTimeout,
		StateInterval: s.o.StateInterval,
	}
}

func (s *Sim) agentConfig(a *Agent, dir string) agent.Config {
	cfg := agent.DefaultConfig()
	cfg.ID = a.ID
	cfg.Data = filepath.Join(dir, a.ID)
	cfg.Labels = a.Labels
	cfg.Broker = s.o.Broker
	cfg.Controller = s.o.Controller
	cfg.SpoolMaxRecords = s.o.SpoolMaxRecords
	cfg.ReleaseKeys = s.o.ReleaseKeys
	cfg.DirectorKeys = s.o.DirectorKeys
	cfg.AllowUnsigned = s.o.AllowUnsigned
	if s.o.Configure != nil {
		s.o.Configure(a, &cfg)
	}
	return cfg
}
