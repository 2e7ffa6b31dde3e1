// Package broker runs the controller's embedded MQTT broker
// (github.com/mochi-mqtt/server/v2), so that one controller process is a
// working fleet. The controller itself talks to it like any other client,
// over TCP through paho, so the same controller code works against an
// external broker.
//
// Access control is a mochi hook. With Options.TLS the public listener
// speaks only TLS and requires a client certificate signed by the fleet
// CA; the access hook (access.go) takes each client's identity from its
// verified certificate and confines device X to its own topics under
// ef/v1/dev/X/, while the controller identity may use every topic. Without
// TLS every client may do everything: fine on a loopback-only broker for
// development and demos, never on a network.
//
// Retained desired-state messages survive a restart: a storage hook keeps
// them in the controller's database. Other retained topics (state,
// presence) are not kept: the agents publish them again when they
// reconnect, and a restored "online" presence would be a lie about a
// device that has not. With Options.UnretainedReports (the controller's
// setting) they are not retained even in memory (reports.go).
package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// MaxPacketSize caps one MQTT packet. Payloads are capped at
// wire.MaxPayload (256 KiB) by the receivers; the broker's cap is looser so
// an oversize payload still reaches the controller and is counted there,
// while a client cannot make the broker buffer arbitrary amounts.
const MaxPacketSize = 1 << 20

// ClientWritesPending bounds the packets waiting to be written to one
// client; mochi drops what does not fit. mochi's default, 8,192, allocates
// 64 KiB of queue per connection (some 640 MiB at 10,000 devices). A device
// is sent its desired state, key announcements, commands and telemetry
// acks (one per stored group, bounded by its send window), far below this.
// The controller's own reading does not go through such a queue at all
// (SubscribeInline).
const ClientWritesPending = 256

// ClientReadBuffer is each connection's read buffer. mochi's default,
// 2 KiB, is 20 MiB at 10,000 devices, every byte of it held for the
// whole connection. Most of what devices send is far shorter (states,
// acks, events); a longer packet (a telemetry batch) is read past the
// buffer, straight into the packet, so a smaller one costs no extra read
// where it matters.
const ClientReadBuffer = 1 << 10

// Options configure the embedded broker.
type Options struct {
	// Listen is the TCP address to listen on, e.g. 127.0.0.1:1883. Port 0
	// picks a free port (see Addr).
	Listen string
	// Logger receives the broker's logs; mochi's Info chatter is dropped
	// below Warn unless the logger is enabled for Debug.
	Logger *slog.Logger
	// Retained, if set, keeps retained desired-state messages across
	// restarts.
	Retained RetainStore
	// Auth authenticates clients and checks topic access. Nil means the
	// certificate access hook with TLS, and allowing every client
	// everything (mochi's AllowHook) without.
	Auth mqtt.Hook
	// TLS, if set, serves the public listener with TLS only; its
	// ClientAuth must be tls.RequireAndVerifyClientCert (see ServerTLS).
	TLS *tls.Config
	// ConnectTimeout bounds how long a new connection on the public
	// listener may take to finish the TLS handshake and send CONNECT
	// (default DefaultConnectTimeout). mochi sets no deadline before
	// CONNECT, so without one an idle connection would hold its goroutine
	// and socket forever.
	ConnectTimeout time.Duration
	// UnretainedReports makes the broker keep no retained device state or
	// presence (reports.go). Set it when every reader of those topics
	// subscribes in process before devices are let in, as the controller
	// does (SubscribeInline, Open).
	UnretainedReports bool
}

// DefaultConnectTimeout is the default of Options.ConnectTimeout.
const DefaultConnectTimeout = 10 * time.Second

// deadlineListener gives every accepted connection a deadline; mochi
// replaces it with the keep-alive deadline once CONNECT is read.
type deadlineListener struct {
	net.Listener
	d time.Duration
}

func (l deadlineListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		// An error here concerns this connection only (it is already
		// gone); returning it would stop the listener.
		if err := c.SetDeadline(time.Now().Add(l.d)); err != nil {
			c.Close()
			continue
		}
		return c, nil
	}
}

// Broker is a running (or ready to run) embedded broker.
//
// It has two listeners. The internal one, on a free loopback port, is
// served from the start and is where the controller's own client connects.
// The public one (Options.Listen), where devices connect, is bound at once
// but served only after Open: the controller opens it once its client has
// subscribed, so no device message published right after a restart reaches
// a broker with nobody subscribed and gets lost. Devices that connect
// earlier wait in the listen backlog.
type Broker struct {
	srv      *mqtt.Server
	retain   *retainHook // nil without a store
	access   *accessHook // nil without TLS, or with Options.Auth
	tls      bool
	ln       net.Listener // public
	internal net.Listener
	log      *slog.Logger
	served   chan struct{}
	openOnce sync.Once
	openErr  error
	// inlineSubs numbers SubscribeInline's subscriptions.
	inlineSubs atomic.Int32
}

// Listener ids, as hooks see them in Client.Net.Listener.
const (
	PublicListener   = "tcp"
	InternalListener = "internal"
)

// New configures the broker and binds its listener, so Addr is known before
// Run and a port conflict is reported at once.
func New(opts Options) (*Broker, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = MaxPacketSize
	caps.MaximumClientWritesPending = ClientWritesPending
	// Mochi drops retained messages older than a day by default; a desired
	// state must stay retained until it is replaced, however long its
	// device is away.
	caps.MaximumMessageExpiryInterval = 0
	srv := mqtt.New(&mqtt.Options{
		Capabilities: caps,
		Logger:       slog.New(minLevel{h: log.Handler(), min: slog.LevelWarn}),
		// The controller publishes desired states in-process (inline.go).
		InlineClient:            true,
		ClientNetReadBufferSize: ClientReadBuffer,
	})
	if opts.TLS != nil && opts.TLS.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil, errors.New("broker: TLS without verified client certificates would let any client in; build the TLS configuration with ServerTLS")
	}
	authHook := opts.Auth
	var access *accessHook
	if authHook == nil && opts.TLS != nil {
		var err error
		if access, err = newAccessHook(log.With("hook", "access")); err != nil {
			return nil, err
		}
		authHook = access
	}
	if authHook == nil {
		authHook = new(auth.AllowHook)
	}
	if err := srv.AddHook(authHook, nil); err != nil {
		return nil, fmt.Errorf("broker: add auth hook %s: %w", authHook.ID(), err)
	}
	if opts.UnretainedReports {
		if err := srv.AddHook(new(reportsHook), nil); err != nil {
			return nil, fmt.Errorf("broker: add reports hook: %w", err)
		}
	}
	var retain *retainHook
	if opts.Retained != nil {
		retain = newRetainHook(opts.Retained, log)
		if err := srv.AddHook(retain, nil); err != nil {
			return nil, fmt.Errorf("broker: add retained hook: %w", err)
		}
	}
	ln, err := net.Listen("tcp", opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("broker: listen on %s: %w (is another broker or controller running? pick another --mqtt-listen)", opts.Listen, err)
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = DefaultConnectTimeout
	}
	ln = deadlineListener{Listener: ln, d: opts.ConnectTimeout}
	if opts.TLS != nil {
		ln = tls.NewListener(ln, opts.TLS)
	}
	// The internal listener is loopback only and, with TLS, admits only
	// the client presenting the access hook's secret: the controller's own
	// link. Plain TCP there costs no handshake and does not depend on what
	// the operator's server certificate allows (client usage, its name).
	internal, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("broker: internal listener: %w", err)
	}
	if err := srv.AddListener(listeners.NewNet(InternalListener, internal)); err != nil {
		ln.Close()
		internal.Close()
		return nil, fmt.Errorf("broker: add listener: %w", err)
	}
	return &Broker{srv: srv, retain: retain, access: access, tls: opts.TLS != nil, ln: ln, internal: internal, log: log, served: make(chan struct{})}, nil
}

// TLS reports whether the public listener speaks TLS with client
// certificates.
func (b *Broker) TLS() bool { return b.tls }

// InternalCredentials returns the username and password the controller's
// link presents on the internal listener. Both are empty when the broker
// runs without the access hook (no TLS), which admits every client.
func (b *Broker) InternalCredentials() (username, password string) {
	if b.access == nil {
		return "", ""
	}
	return ControllerIdentity, string(b.access.secret)
}

// Addr returns the public address, where devices connect.
func (b *Broker) Addr() net.Addr { return b.ln.Addr() }

// InternalAddr returns the loopback address served from the start, where
// the controller's own client connects.
func (b *Broker) InternalAddr() net.Addr { return b.internal.Addr() }

// Run serves clients until ctx ends, then disconnects them and stops.
func (b *Broker) Run(ctx context.Context) error {
	if err := b.srv.Serve(); err != nil {
		b.Close()
		return fmt.Errorf("broker: %w", err)
	}
	var flushed chan struct{}
	if b.retain != nil {
		// The writer outlives the server: it stops only after srv.Close,
		// so the last retained messages are written too.
		wctx, stopWriter := context.WithCancel(context.Background())
		defer stopWriter()
		flushed = make(chan struct{})
		go func() { b.retain.run(wctx); close(flushed) }()
		defer func() { stopWriter(); <-flushed }()
	}
	close(b.served)
	<-ctx.Done()
	if err := b.srv.Close(); err != nil {
		return fmt.Errorf("broker: close: %w", err)
	}
	// The public listener is the server's to close only once opened.
	b.Close()
	b.log.Info("mqtt broker stopped")
	return nil
}

// Open starts serving the public listener. Call it after Run has started;
// it waits until the server is up.
func (b *Broker) Open() error {
	<-b.served
	b.openOnce.Do(func() {
		if err := b.srv.AddListener(listeners.NewNet(PublicListener, b.ln)); err != nil {
			b.openErr = fmt.Errorf("broker: open public listener: %w", err)
			return
		}
		b.srv.Listeners.Serve(PublicListener, b.srv.EstablishConnection)
		b.log.Info("mqtt broker listening", "addr", b.Addr().String(), "tls_client_certificates", b.tls)
	})
	return b.openErr
}

// Close releases the listeners of a broker that was never Run.
func (b *Broker) Close() error {
	err := b.ln.Close()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	if ierr := b.internal.Close(); ierr != nil && !errors.Is(ierr, net.ErrClosed) && err == nil {
		err = ierr
	}
	return err
}

// minLevel drops records below min unless the wrapped handler wants Debug:
// mochi logs every hook and listener it adds at Info, which is noise in the
// controller's log.
type minLevel struct {
	h   slog.Handler
	min slog.Level
}

func (m minLevel) Enabled(ctx context.Context, l slog.Level) bool {
	if m.h.Enabled(ctx, slog.LevelDebug) {
		return true
	}
	return l >= m.min && m.h.Enabled(ctx, l)
}

func (m minLevel) Handle(ctx context.Context, r slog.Record) error {
	// mochi warns, with no message, about every connection its listener
	// closes on shutdown or on a client's DISCONNECT; that is not news.
	if r.Message == "" {
		closed := false
		r.Attrs(func(a slog.Attr) bool {
			if err, ok := a.Value.Any().(error); ok && errors.Is(err, net.ErrClosed) {
				closed = true
			}
			return !closed
		})
		if closed {
			return nil
		}
	}
	return m.h.Handle(ctx, r)
}

func (m minLevel) WithAttrs(a []slog.Attr) slog.Handler {
	return minLevel{h: m.h.WithAttrs(a), min: m.min}
}

func (m minLevel) WithGroup(name string) slog.Handler {
	return minLevel{h: m.h.WithGroup(name), min: m.min}
}
