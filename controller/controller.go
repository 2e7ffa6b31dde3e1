// Package controller assembles the Edgefleet control plane: the embedded
// MQTT broker (or a link to an external one), the SQLite store, the
// inventory and telemetry ingest fed by device messages, the director that
// publishes desired states, the rollout engine that drives staged
// rollouts, the model registry, and the HTTP API.
//
// Lifecycle: New opens the store and binds every listener (so address
// conflicts fail fast and tests can use port 0); Run serves until its
// context ends and then stops the parts in dependency order: HTTP first (no
// new assignments), then the rollout engine (no new decisions), then the
// MQTT link (no new messages), then the broker, then the director's
// bookkeeping, then the database.
package controller

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/edgefleet/edgefleet/controller/access"
	"github.com/edgefleet/edgefleet/controller/api"
	"github.com/edgefleet/edgefleet/controller/broker"
	"github.com/edgefleet/edgefleet/controller/director"
	"github.com/edgefleet/edgefleet/controller/inventory"
	"github.com/edgefleet/edgefleet/controller/link"
	"github.com/edgefleet/edgefleet/controller/metrics"
	"github.com/edgefleet/edgefleet/controller/registry"
	"github.com/edgefleet/edgefleet/controller/rollout"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/controller/telemetry"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// Controller is one assembled control plane.
type Controller struct {
	cfg       Config
	log       *slog.Logger
	store     *store.Store
	broker    *broker.Broker // nil with an external broker
	brokerURL string
	link      *link.Link
	inventory *inventory.Inventory
	ingest    *telemetry.Ingest
	pruner    *telemetry.Pruner
	drops     *telemetry.Drops
	director  *director.Director
	renewer   *director.Renewer
	rollouts  *rollout.Engine
	metrics   *metrics.Registry
	stopping  chan struct{}
	httpLn    net.Listener
	httpSrv   *http.Server
	// adminToken is the file of the first admin token; adminTokenNew is
	// set when this start wrote it.
	adminToken    string
	adminTokenNew bool
}

// New validates cfg, opens the store and binds the listeners. Call Run to
// serve, or Close to release what New took.
func New(ctx context.Context, cfg Config, log *slog.Logger) (*Controller, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	st, err := store.Open(ctx, filepath.Join(cfg.DataDir, store.FileName))
	if err != nil {
		return nil, err
	}
	c := &Controller{cfg: cfg, log: log, store: st, metrics: metrics.NewRegistry(), stopping: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			c.Close()
		}
	}()

	c.brokerURL = cfg.Broker
	var linkTLS *tls.Config
	if cfg.Broker == "" {
		var brokerTLS *tls.Config
		if cfg.MQTTTLS() {
			if brokerTLS, err = broker.ServerTLS(cfg.MQTTTLSCert, cfg.MQTTTLSKey, cfg.MQTTClientCA); err != nil {
				return nil, fmt.Errorf("--mqtt-tls-cert/--mqtt-tls-key/--mqtt-client-ca: %w", err)
			}
		}
		// The link reads device messages in process, subscribed before
		// devices are let in, so the broker need not retain their state
		// and presence (broker.Options.UnretainedReports).
		c.broker, err = broker.New(broker.Options{Listen: cfg.MQTTListen, Logger: log.With("component", "broker"), Retained: desiredRetained{st}, TLS: brokerTLS,
			UnretainedReports: true})
		if err != nil {
			return nil, err
		}
		scheme := "tcp://"
		if brokerTLS != nil {
			scheme = "ssl://"
		}
		c.brokerURL = scheme + dialable(c.broker.Addr())
	} else if cfg.MQTTTLS() {
		if linkTLS, err = link.ClientTLS(cfg.MQTTTLSCert, cfg.MQTTTLSKey, cfg.MQTTClientCA); err != nil {
			return nil, fmt.Errorf("--mqtt-tls-cert/--mqtt-tls-key/--mqtt-client-ca: %w", err)
		}
	}
	linkURL := c.brokerURL
	var linkUser, linkPassword string
	if c.broker != nil {
		linkURL = "tcp://" + c.broker.InternalAddr().String()
		linkUser, linkPassword = c.broker.InternalCredentials()
	}
	warnExposed(log, cfg, c.broker != nil && c.broker.TLS())

	// The API accepts no change without a token; a new controller makes
	// the first admin token and leaves it where only its owner reads it.
	if c.adminToken, c.adminTokenNew, err = access.Bootstrap(ctx, st, cfg.DataDir); err != nil {
		return nil, err
	}
	if c.adminTokenNew {
		log.Info("first start: admin API token written; use it with fleet --token or EDGEFLEET_TOKEN, and make narrower tokens with `fleet token create`", "file", c.adminToken)
	}
	reg, err := registry.New(cfg.DataDir, st, log)
	if err != nil {
		return nil, err
	}
	// Device messages come from the embedded broker in process, where a
	// slow moment of the controller holds devices back instead of making
	// the broker drop what it could not send (see broker.SubscribeInline).
	var inline link.InlineSubscriber
	if c.broker != nil {
		inline = c.broker
	}
	c.link, err = link.New(link.Options{
		Broker:    linkURL,
		Inline:    inline,
		Handler:   link.HandlerFunc(c.handleMessage),
		Logger:    log.With("component", "mqtt"),
		Metrics:   c.metrics,
		OnConnect: c.onConnect,

		PublishTimeout: cfg.publishTimeout,
		ConnectTimeout: cfg.connectTimeout,

		TLS: linkTLS, Username: linkUser, Password: linkPassword,

		LazyTelemetry: true,
	})
	if err != nil {
		return nil, fmt.Errorf("--broker: %w", err)
	}
	// Desired states go straight into the embedded broker (see
	// broker.Publish for why); to an external broker, through the link.
	var desiredPub director.Publisher = c.link
	if c.broker != nil {
		desiredPub = c.broker
	}
	// Agents verify every desired state against this key's public half,
	// DATA/keys/director.pub, which they are given as --director-key.
	directorKey, keyNew, err := director.LoadOrCreateKey(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	if keyNew {
		log.Info("first start: director key made; give every agent its public half as --director-key", "file", filepath.Join(cfg.DataDir, director.KeysDir, director.PublicKeyFile))
	}
	c.director = director.New(director.Options{
		Store: st, Publisher: desiredPub, Logger: log, Metrics: c.metrics, ArtifactBaseURL: cfg.PublicURL,
		Key: directorKey,
	})
	if c.renewer, err = c.director.NewRenewer(director.RenewOptions{Store: st, Before: cfg.renewBefore}); err != nil {
		return nil, fmt.Errorf("--desired-renew-before: %w", err)
	}
	// Key announcements (DATA/keys/announcements.pb) go to every known
	// device after a rotation and to each device at its hello.
	if err := c.director.EnableRotation(cfg.DataDir, func(ctx context.Context) ([]string, error) {
		devs, err := st.Devices(ctx)
		ids := make([]string, 0, len(devs))
		for _, d := range devs {
			ids = append(ids, d.ID)
		}
		return ids, err
	}); err != nil {
		return nil, err
	}
	// A device whose hello was lost is asked to resync (say hello again).
	c.inventory = inventory.New(st, c.director, log, inventory.WithMetrics(c.metrics), inventory.WithResync(c.link, st))
	// Telemetry acks, like desired states, go straight into the embedded
	// broker.
	var ackPub telemetry.Publisher = c.link
	if c.broker != nil {
		ackPub = c.broker
	}
	c.ingest = telemetry.New(telemetry.Options{Store: st, Publisher: ackPub, Logger: log, Metrics: c.metrics, KeepRaw: cfg.rawRetention > 0})
	c.drops = telemetry.NewDrops(c.metrics)
	c.registerMetrics()
	c.pruner = &telemetry.Pruner{Store: st, RawRetention: cfg.rawRetention, AggRetention: cfg.retention, Logger: log.With("component", "telemetry")}
	var ropts rollout.Options
	if cfg.rolloutTuning != nil {
		ropts = *cfg.rolloutTuning
	}
	ropts.Store, ropts.Issuer, ropts.Logger, ropts.Metrics = st, c.director, log.With("component", "rollouts"), c.metrics
	if ropts.Drift == nil {
		ropts.Drift = &telemetry.DriftSource{Store: st}
	}
	if c.rollouts, err = rollout.New(ropts); err != nil {
		return nil, err
	}

	c.httpLn, err = net.Listen("tcp", cfg.HTTPListen)
	if err != nil {
		return nil, fmt.Errorf("http: listen on %s: %w (is another controller running? pick another --http-listen)", cfg.HTTPListen, err)
	}
	c.httpSrv = &http.Server{
		Handler: api.New(api.Options{
			Devices: st, Registry: reg, Releases: reg, Assigner: c.director, Rollouts: c.rollouts, Metrics: c.metrics,
			Tokens: st, Audit: st, Keys: c.director, Telemetry: st,
			Logger: log.With("component", "http"), Stopping: c.stopping,
		}),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	// Event streams never go idle; they end when shutdown begins.
	c.httpSrv.RegisterOnShutdown(func() { close(c.stopping) })
	ok = true
	return c, nil
}

// warnExposed warns, loudly, about listeners reachable from the network
// without the protection they need there: an MQTT broker without client
// certificates lets anyone pose as any device, and the API without TLS
// sends operator tokens in the clear.
func warnExposed(log *slog.Logger, cfg Config, mqttTLS bool) {
	if cfg.Broker == "" && !mqttTLS && !loopback(cfg.MQTTListen) {
		log.Warn("INSECURE: the embedded MQTT broker listens beyond this machine without TLS: any client can pose as any device and read every desired state; set --mqtt-tls-cert, --mqtt-tls-key and --mqtt-client-ca (see SECURITY.md)", "mqtt", cfg.MQTTListen)
	}
	if !loopback(cfg.HTTPListen) {
		log.Warn("INSECURE: the API listens beyond this machine over plain HTTP: operator tokens cross the network in the clear; bind --http-listen to 127.0.0.1 and put a TLS-terminating proxy in front (see SECURITY.md)", "http", cfg.HTTPListen)
	}
}

// loopback reports whether a listen address admits only this machine.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// dialable turns a listening address into one a client can dial: a
// wildcard host (0.0.0.0, ::) becomes loopback.
func dialable(a net.Addr) string {
	host, port, err := net.SplitHostPort(a.String())
	if err != nil {
		return a.String()
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// AdminTokenFile returns the path of the first admin token's file
// (DATA/admin.token); the file exists only if nobody removed it.
func (c *Controller) AdminTokenFile() string {
	return filepath.Join(c.cfg.DataDir, access.AdminTokenFile)
}

// HTTPAddr returns the address the API listens on.
func (c *Controller) HTTPAddr() string { return c.httpLn.Addr().String() }

// MQTTAddr returns the embedded broker's address, or the external broker's
// URL.
func (c *Controller) MQTTAddr() string {
	if c.broker != nil {
		return c.broker.Addr().String()
	}
	return c.brokerURL
}

// Metrics returns the controller's metrics registry.
func (c *Controller) Metrics() *metrics.Registry { return c.metrics }

// Close releases what New took, for a controller that is not Run.
func (c *Controller) Close() error {
	if c.httpLn != nil {
		c.httpLn.Close()
	}
	if c.broker != nil {
		c.broker.Close()
	}
	return c.store.Close()
}

// Run serves until ctx ends or a part fails, then shuts down cleanly. ready,
// if not nil, is called once everything listens.
func (c *Controller) Run(ctx context.Context, ready func()) error {
	if c.broker != nil {
		// Nobody is connected to a broker that is only now starting.
		if err := c.store.MarkAllOffline(ctx); err != nil {
			c.Close()
			return fmt.Errorf("mark devices offline: %w", err)
		}
	}
	type result struct {
		part string
		err  error
	}
	results := make(chan result, 16)
	c.log.Info("controller starting", "mqtt", c.MQTTAddr(), "broker_embedded", c.broker != nil)
	running := 0
	start := func(part string, fn func() error) {
		running++
		go func() { results <- result{part, fn()} }()
	}

	brokerCtx, stopBroker := context.WithCancel(context.Background())
	defer stopBroker()
	linkCtx, stopLink := context.WithCancel(context.Background())
	defer stopLink()
	directorCtx, stopDirector := context.WithCancel(context.Background())
	defer stopDirector()
	rolloutsCtx, stopRollouts := context.WithCancel(context.Background())
	defer stopRollouts()
	if c.broker != nil {
		start("broker", func() error { return c.broker.Run(brokerCtx) })
	}
	start("director", func() error { return c.director.Run(directorCtx) })
	// The telemetry writer outlives the link, so what the link handed
	// over is committed (and acked, if the link can still publish).
	telemetryCtx, stopTelemetry := context.WithCancel(context.Background())
	defer stopTelemetry()
	start("telemetry", func() error { return c.ingest.Run(telemetryCtx) })
	// So does the inventory's writer: it stores what is queued before it
	// stops.
	start("inventory", func() error { return c.inventory.Run(telemetryCtx) })
	start("telemetry pruner", func() error { return c.pruner.Run(telemetryCtx) })
	start("mqtt link", func() error { return c.link.Run(linkCtx) })

	var firstErr error
	done := map[string]bool{}
	record := func(r result) {
		running--
		done[r.part] = true
		if r.err == nil && firstErr == nil && ctx.Err() == nil {
			r.err = errors.New("stopped unexpectedly")
		}
		if r.err != nil && firstErr == nil {
			firstErr = fmt.Errorf("%s: %w", r.part, r.err)
			c.log.Error("controller part stopped; shutting down", "part", r.part, "err", r.err)
		}
	}

	// Devices are let in, and the API answers, only once the controller's
	// own subscriptions are in place (see broker.Broker).
	serving := false
	select {
	case <-ctx.Done():
	case r := <-results:
		record(r)
	case <-c.link.Ready():
		serving = true
	}
	if serving {
		if c.broker != nil {
			if err := c.broker.Open(); err != nil {
				firstErr = err
				serving = false
			}
		}
	}
	if serving {
		// Rollouts resume once device messages flow, so what the devices
		// say on reconnecting reaches them.
		start("rollouts", func() error { return c.rollouts.Run(rolloutsCtx) })
		// Desired states are renewed before they expire (director/reissue.go).
		start("desired renewals", func() error { return c.renewer.Run(rolloutsCtx) })
		start("http", func() error {
			if err := c.httpSrv.Serve(c.httpLn); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
		c.log.Info("controller ready", "http", c.HTTPAddr(), "mqtt", c.MQTTAddr(), "data", c.cfg.DataDir)
		if ready != nil {
			ready()
		}
		select {
		case <-ctx.Done():
		case r := <-results:
			record(r)
		}
	}

	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.httpSrv.Shutdown(shutdownCtx); err != nil {
		c.log.Warn("http shutdown", "err", err)
	}
	c.httpLn.Close() // never served if shut down before ready
	// An empty part waits for all.
	waitFor := func(part string) {
		for running > 0 && (part == "" || !done[part]) {
			record(<-results)
		}
	}
	if serving {
		stopRollouts()
		waitFor("rollouts")
		waitFor("desired renewals")
	}
	stopLink()
	// The broker goes last among the network parts, so the link's
	// disconnect reaches it.
	waitFor("mqtt link")
	stopTelemetry()
	waitFor("telemetry")
	waitFor("inventory")
	stopBroker()
	if c.broker != nil {
		waitFor("broker")
	}
	// The director records the last acknowledgements once nothing can
	// publish any more.
	stopDirector()
	waitFor("")
	if err := c.store.Close(); err != nil && firstErr == nil {
		firstErr = fmt.Errorf("close database: %w", err)
	}
	c.log.Info("controller stopped")
	return firstErr
}

// Run runs a controller with cfg until ctx ends: logs go to stderr at
// cfg.LogLevel, and one line on stdout says when it is ready:
//
//	controller ready http=127.0.0.1:8080 mqtt=127.0.0.1:1883
func Run(ctx context.Context, cfg Config) error {
	return RunWith(ctx, cfg, os.Stdout, os.Stderr)
}

// RunWith is Run with the output streams given.
func RunWith(ctx context.Context, cfg Config, stdout, stderr io.Writer) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	level, _ := cfg.Level()
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	c, err := New(ctx, cfg, log)
	if err != nil {
		return err
	}
	return c.Run(ctx, func() {
		// stdout keeps its one ready line (scripts read it); the token's
		// whereabouts go beside the logs.
		if c.adminTokenNew {
			fmt.Fprintf(stderr, "admin API token written to %s (mode 0600): export EDGEFLEET_TOKEN=$(cat %s)\n", c.adminToken, c.adminToken)
		}
		fmt.Fprintf(stdout, "controller ready http=%s mqtt=%s\n", c.HTTPAddr(), c.MQTTAddr())
	})
}

// onConnect runs after every (re)connect of the MQTT link.
func (c *Controller) onConnect(ctx context.Context) {
	if err := c.director.RepublishPending(ctx); err != nil && ctx.Err() == nil {
		c.log.Error("re-publish pending desired states", "err", err)
	}
}

// handleMessage routes one device message to the part that owns its kind.
func (c *Controller) handleMessage(ctx context.Context, m link.Message) error {
	at := m.Received
	if m.Retained {
		// A retained message may be old: it says the device was seen when
		// it sent it, not now. The device's clock can be wrong, so never
		// later than now.
		if sent := time.UnixMilli(m.Envelope.GetSentAtUnixMs()); sent.Before(at) {
			at = sent
		}
	}
	env := m.Envelope
	id := m.DeviceID
	// Hellos, states, presences and events go to the inventory's group
	// commit; what acts on them runs once they are stored.
	u := inventory.Update{DeviceID: id, At: at, Done: func(err error) {
		if err == nil {
			c.rollouts.DeviceReported(id, m.Received)
		}
	}}
	switch m.Kind {
	case wire.KindHello:
		u.Hello = env.GetHello()
		u.Done = func(err error) {
			// The key chain goes out whether or not the hello was
			// stored: a device that missed a rotation needs it anyway.
			c.director.PublishKeys(id)
			if err == nil {
				c.rollouts.DeviceReported(id, m.Received)
			}
		}
	case wire.KindState:
		u.State = env.GetState()
		c.drops.Report(id, u.State.GetSpoolDroppedByClass())
	case wire.KindPresence:
		u.Presence = env.GetPresence()
	case wire.KindEvents:
		u.Event = env.GetEvent()
	case wire.KindTelemetry:
		// Decoded and stored off this worker (telemetry.Ingest.Handle);
		// only the events a batch carries (spooled while offline) move
		// rollouts, once they are stored. Inference records are read by
		// the gates.
		m.Received = at
		if err := c.inventory.Seen(ctx, id); err != nil {
			return err
		}
		return c.ingest.Handle(ctx, m, u.Done)
	default:
		return fmt.Errorf("no handler for %s messages", m.Kind)
	}
	return c.inventory.Submit(ctx, u)
}
