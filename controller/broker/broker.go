// Package broker runs the controller's embedded MQTT broker
// (github.com/mochi-mqtt/server/v2), so that one controller process is a
// working fleet. The controller itself talks to it like any other client,
// over TCP through paho, so the same controller code works against an
// external broker.
//
// Access control is a mochi hook: Options.Auth. Until device certificates
// exist it defaults to allowing every client; the mTLS/ACL work replaces it
// with a hook that confines device X to ef/v1/dev/X/.
//
// Retained desired-state messages survive a restart: a storage hook keeps
// them in the controller's database. Other retained topics (state,
// presence) are not kept: the agents publish them again when they
// reconnect, and a restored "online" presence would be a lie about a
// device that has not.
package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
)

// MaxPacketSize caps one MQTT packet. Payloads are capped at
// wire.MaxPayload (256 KiB) by the receivers; the broker's cap is looser so
// an oversize payload still reaches the controller and is counted there,
// while a client cannot make the broker buffer arbitrary amounts.
const MaxPacketSize = 1 << 20

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
	// Auth authenticates clients and checks topic access. Nil allows every
	// client everything (mochi's AllowHook).
	Auth mqtt.Hook
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
	ln       net.Listener // public
	internal net.Listener
	log      *slog.Logger
	served   chan struct{}
	openOnce sync.Once
	openErr  error
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
	srv := mqtt.New(&mqtt.Options{
		Capabilities: caps,
		Logger:       slog.New(minLevel{h: log.Handler(), min: slog.LevelWarn}),
	})
	authHook := opts.Auth
	if authHook == nil {
		authHook = new(auth.AllowHook)
	}
	if err := srv.AddHook(authHook, nil); err != nil {
		return nil, fmt.Errorf("broker: add auth hook %s: %w", authHook.ID(), err)
	}
	if opts.Retained != nil {
		if err := srv.AddHook(&retainHook{store: opts.Retained, log: log}, nil); err != nil {
			return nil, fmt.Errorf("broker: add retained hook: %w", err)
		}
	}
	ln, err := net.Listen("tcp", opts.Listen)
	if err != nil {
		return nil, fmt.Errorf("broker: listen on %s: %w (is another broker or controller running? pick another --mqtt-listen)", opts.Listen, err)
	}
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
	return &Broker{srv: srv, ln: ln, internal: internal, log: log, served: make(chan struct{})}, nil
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
		b.log.Info("mqtt broker listening", "addr", b.Addr().String())
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
