// Package link keeps the agent's MQTT session with the broker: one
// persistent session (client id = device id, clean session off, QoS 1),
// a retained presence with an offline last will, and a reconnect loop with
// exponential backoff and jitter.
//
// paho's own auto-reconnect is off. Its backoff has no jitter, and a
// fleet of thousands of agents that lose the broker together would all come
// back at the same instants and knock it over again. Link runs its own loop
// on the same paho client (so the client's store keeps QoS 1 messages in
// flight across reconnects) and sleeps a jittered, capped, exponential delay
// between attempts.
//
// Connection states and their transitions:
//
//	disconnected --connect ok--> connected --connection lost--> backoff
//	disconnected --connect failed--> backoff --delay over--> disconnected
//	any --ctx done--> stopped (publishes presence offline, disconnects)
package link

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"slices"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"github.com/edgefleet/edgefleet/proto/wire/pahostore"
	"google.golang.org/protobuf/proto"
)

// ErrOffline is returned by Publish while the link has no connection.
var ErrOffline = errors.New("not connected to the broker")

// Subscribed lists the topics (kinds) the agent receives.
var Subscribed = []wire.Kind{wire.KindDesired, wire.KindAck, wire.KindCmd, wire.KindKeys}

// Options configures a Link. DeviceID and Broker are required.
type Options struct {
	// Broker is the broker's URL: tcp://host:port (also ssl://, ws://).
	Broker   string
	DeviceID string
	Logger   *slog.Logger
	// Handle receives every well-formed message on the device's topics
	// listed in Subscribed (desired, ack, cmd, keys). It runs on the MQTT client's goroutine, in
	// arrival order, and must not block: hand the message to a channel.
	Handle func(kind wire.Kind, env *pb.Envelope)
	// OnConnect runs after every (re)connect, once presence is published
	// and the subscriptions are in place; publish hello and state here. It
	// runs on Run's goroutine, so it may block on publishes.
	OnConnect func(ctx context.Context)
	// OnDisconnect runs when a connection is lost. It must not block.
	OnDisconnect func()
	// Dial opens the network connection for tcp:// brokers; nil means
	// net.Dialer. Tests use it to cut connections.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// MinBackoff and MaxBackoff bound the delay between connection
	// attempts (defaults 1s and 60s).
	MinBackoff, MaxBackoff time.Duration
	// ConnectTimeout bounds one connection attempt (default 10s).
	ConnectTimeout time.Duration
	// KeepAlive is the MQTT keep-alive (default 30s).
	KeepAlive time.Duration
	// Now and Rand are the clock and the jitter source; nil means the real ones.
	Now  func() time.Time
	Rand func() float64
	// TLSCert and TLSKey name the device's client certificate and key
	// files, for ssl://, tls://, mqtts:// and wss:// brokers. They are read
	// again at every connection attempt, so a renewed certificate is
	// picked up without a restart. TLSCA names the CA file of the broker's
	// certificate; empty trusts the system's CAs.
	TLSCert, TLSKey, TLSCA string
}

// Link is one device's MQTT session. Create it with New and run it with Run.
type Link struct {
	o         Options
	log       *slog.Logger
	tls       *tls.Config // nil for unencrypted brokers
	client    atomic.Pointer[mqtt.Client]
	connected atomic.Bool

	connects  atomic.Uint64
	malformed atomic.Uint64
	oversized atomic.Uint64
}

// Stats are counters for /metrics.
type Stats struct {
	Connected bool
	// Connects counts successful connections, the first one included.
	Connects uint64
	// Malformed counts messages dropped because they failed wire.Open.
	Malformed uint64
	// Oversized counts the malformed messages dropped unread for being
	// over wire.MaxPayload.
	Oversized uint64
}

// New checks the options and returns a Link that is not yet connected.
func New(o Options) (*Link, error) {
	if err := wire.ValidateDeviceID(o.DeviceID); err != nil {
		return nil, fmt.Errorf("link: %w", err)
	}
	u, err := url.Parse(o.Broker)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("link: broker URL %q: want tcp://host:port", o.Broker)
	}
	tlsCfg, err := clientTLS(u, o)
	if err != nil {
		return nil, fmt.Errorf("link: %w", err)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.MinBackoff <= 0 {
		o.MinBackoff = time.Second
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 60 * time.Second
	}
	if o.MaxBackoff < o.MinBackoff {
		o.MaxBackoff = o.MinBackoff
	}
	if o.ConnectTimeout <= 0 {
		o.ConnectTimeout = 10 * time.Second
	}
	if o.KeepAlive <= 0 {
		o.KeepAlive = 30 * time.Second
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Rand == nil {
		o.Rand = rand.Float64
	}
	return &Link{o: o, tls: tlsCfg, log: o.Logger.With("device", o.DeviceID, "broker", o.Broker)}, nil
}

// Connected reports whether the link has a connection now.
func (l *Link) Connected() bool { return l.connected.Load() }

// Stats returns the link's counters.
func (l *Link) Stats() Stats {
	return Stats{Connected: l.connected.Load(), Connects: l.connects.Load(), Malformed: l.malformed.Load(), Oversized: l.oversized.Load()}
}

// Publish seals body for this device and publishes it on the topic of
// kind, QoS 1, retained when the kind is retained. It waits for the
// broker's acknowledgement or ctx, and returns ErrOffline (wrapped) when
// there is no connection.
func (l *Link) Publish(ctx context.Context, kind wire.Kind, body proto.Message) error {
	c := l.client.Load()
	if c == nil || !l.connected.Load() {
		return fmt.Errorf("publish %s: %w", kind, ErrOffline)
	}
	return l.publish(ctx, *c, kind, body)
}

func (l *Link) publish(ctx context.Context, c mqtt.Client, kind wire.Kind, body proto.Message) error {
	payload, err := wire.Seal(l.o.DeviceID, l.o.Now(), body)
	if err != nil {
		return err
	}
	t := c.Publish(wire.Topic(l.o.DeviceID, kind), 1, kind.Retained(), payload)
	select {
	case <-t.Done():
		if err := t.Error(); err != nil {
			if errors.Is(err, mqtt.ErrNotConnected) {
				return fmt.Errorf("publish %s: %w", kind, ErrOffline)
			}
			return fmt.Errorf("publish %s: %w", kind, err)
		}
		return nil
	case <-ctx.Done():
		return fmt.Errorf("publish %s: %w", kind, ctx.Err())
	}
}

// Run connects and keeps the session up until ctx ends; then it publishes
// presence offline, disconnects and returns nil. It fails only when the
// client cannot be set up at all.
func (l *Link) Run(ctx context.Context) error {
	will, err := wire.Seal(l.o.DeviceID, l.o.Now(), &pb.Presence{Online: false})
	if err != nil {
		return err
	}
	lost := make(chan error, 1)
	opts := mqtt.NewClientOptions().
		AddBroker(l.o.Broker).
		SetClientID(l.o.DeviceID).
		SetCleanSession(false).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetOrderMatters(true).
		SetKeepAlive(l.o.KeepAlive).
		SetPingTimeout(l.o.KeepAlive/2+time.Second).
		SetConnectTimeout(l.o.ConnectTimeout).
		SetWriteTimeout(l.o.ConnectTimeout).
		SetStore(pahostore.New()).
		SetBinaryWill(wire.Topic(l.o.DeviceID, wire.KindPresence), will, 1, true).
		// Queued messages of the persistent session may arrive before
		// Subscribe returns, so everything goes through one default handler.
		SetDefaultPublishHandler(l.onMessage).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			select {
			case lost <- err:
			default:
			}
		})
	if l.tls != nil {
		opts.SetTLSConfig(l.tls)
	}
	if l.o.Dial != nil {
		opts.SetCustomOpenConnectionFn(func(u *url.URL, o mqtt.ClientOptions) (net.Conn, error) {
			ctx, cancel := context.WithTimeout(context.Background(), o.ConnectTimeout)
			defer cancel()
			conn, err := l.o.Dial(ctx, "tcp", u.Host)
			if err != nil || l.tls == nil {
				return conn, err
			}
			cfg := l.tls.Clone()
			cfg.ServerName = u.Hostname()
			tc := tls.Client(conn, cfg)
			if err := tc.HandshakeContext(ctx); err != nil {
				conn.Close()
				return nil, err
			}
			return tc, nil
		})
	}
	client := mqtt.NewClient(opts)
	l.client.Store(&client)

	attempt := 0
	for {
		err := l.connect(ctx, client)
		if err == nil {
			since := time.Now()
			l.connected.Store(true)
			l.connects.Add(1)
			l.log.Info("connected to broker")
			stop := l.serve(ctx, client, lost)
			l.connected.Store(false)
			if stop {
				l.shutdown(ctx, client)
				return nil
			}
			if l.o.OnDisconnect != nil {
				l.o.OnDisconnect()
			}
			// A connection that held for a while resets the backoff; one
			// that drops right away (a broker refusing us after CONNACK)
			// keeps growing it.
			if time.Since(since) > l.o.MaxBackoff {
				attempt = 0
			}
		} else if ctx.Err() != nil {
			return nil
		} else {
			l.log.Warn("cannot connect to broker", "attempt", attempt+1, "err", err)
		}
		d := Backoff(attempt, l.o.MinBackoff, l.o.MaxBackoff, l.o.Rand())
		attempt++
		t := time.NewTimer(d)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// connect makes one connection attempt, bounded by ConnectTimeout and ctx.
func (l *Link) connect(ctx context.Context, client mqtt.Client) error {
	t := client.Connect()
	select {
	case <-t.Done():
		return t.Error()
	case <-ctx.Done():
		// The attempt finishes on its own within ConnectTimeout; make sure
		// a late success does not leave a connection behind.
		go func() {
			<-t.Done()
			if t.Error() == nil {
				client.Disconnect(0)
			}
		}()
		return ctx.Err()
	}
}

// serve sets the session up and waits until the connection is lost
// (returns false) or ctx ends (returns true).
func (l *Link) serve(ctx context.Context, client mqtt.Client, lost <-chan error) bool {
	for attempt := 0; ; attempt++ {
		err := l.setup(ctx, client)
		if err == nil {
			break
		}
		l.log.Error("session setup failed; retrying", "err", err)
		t := time.NewTimer(Backoff(attempt, l.o.MinBackoff, l.o.MaxBackoff, l.o.Rand()))
		select {
		case <-ctx.Done():
			t.Stop()
			return true
		case err := <-lost:
			t.Stop()
			l.log.Warn("connection lost", "err", err)
			return false
		case <-t.C:
		}
	}
	if l.o.OnConnect != nil {
		l.o.OnConnect(ctx)
	}
	select {
	case <-ctx.Done():
		return true
	case err := <-lost:
		l.log.Warn("connection lost", "err", err)
		return false
	}
}

func (l *Link) setup(ctx context.Context, client mqtt.Client) error {
	ctx, cancel := context.WithTimeout(ctx, l.o.ConnectTimeout)
	defer cancel()
	if err := l.publish(ctx, client, wire.KindPresence, &pb.Presence{Online: true}); err != nil {
		return err
	}
	filters := map[string]byte{}
	for _, k := range Subscribed {
		filters[wire.Topic(l.o.DeviceID, k)] = 1
	}
	t := client.SubscribeMultiple(filters, nil)
	select {
	case <-t.Done():
		if err := t.Error(); err != nil {
			return fmt.Errorf("subscribe: %w", err)
		}
	case <-ctx.Done():
		return fmt.Errorf("subscribe: %w", ctx.Err())
	}
	for topic, qos := range t.(*mqtt.SubscribeToken).Result() {
		if qos != 0x80 {
			continue
		}
		if topic == wire.Topic(l.o.DeviceID, wire.KindKeys) {
			// A broker ACL written before key rotation existed: the agent
			// works, but learns no rotated key until the ACL allows it.
			l.log.Warn("the broker refuses the key announcements topic; key rotation cannot reach this agent: add `pattern read ef/v1/dev/%u/keys` to the broker's ACL", "topic", topic)
			continue
		}
		return fmt.Errorf("subscribe %s: the broker refused; check its ACL for device %s", topic, l.o.DeviceID)
	}
	return nil
}

// shutdown says goodbye: the last will only fires on an unclean
// disconnect, so a clean stop publishes presence offline itself.
func (l *Link) shutdown(ctx context.Context, client mqtt.Client) {
	if client.IsConnectionOpen() {
		pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		if err := l.publish(pctx, client, wire.KindPresence, &pb.Presence{Online: false}); err != nil {
			l.log.Warn("could not publish presence offline", "err", err)
		}
		cancel()
	}
	client.Disconnect(250)
	l.log.Info("disconnected from broker")
}

func (l *Link) onMessage(_ mqtt.Client, m mqtt.Message) {
	topic := m.Topic()
	if len(m.Payload()) == 0 {
		// An empty retained message clears the topic; nothing to act on.
		return
	}
	env, err := wire.Open(topic, m.Payload())
	if err != nil {
		l.malformed.Add(1)
		if errors.Is(err, wire.ErrTooLarge) {
			l.oversized.Add(1)
		}
		l.log.Warn("dropped malformed message", "topic", topic, "bytes", len(m.Payload()), "err", err)
		return
	}
	id, kind, _ := wire.ParseTopic(topic)
	if id != l.o.DeviceID || !slices.Contains(Subscribed, kind) {
		l.malformed.Add(1)
		l.log.Warn("dropped message on a topic this agent does not read", "topic", topic)
		return
	}
	if l.o.Handle != nil {
		l.o.Handle(kind, env)
	}
}

// Backoff returns the delay before reconnect attempt n (0-based): an
// exponential min*2^n capped at max, of which the upper half is random
// ("equal jitter"), so agents spread out but none retries sooner than half
// the nominal delay. r is a random number in [0, 1).
func Backoff(n int, min, max time.Duration, r float64) time.Duration {
	d := min
	for i := 0; i < n && d < max; i++ {
		d *= 2
	}
	if d > max || d <= 0 {
		d = max
	}
	half := d / 2
	return half + time.Duration(r*float64(d-half))
}

// clientTLS returns the TLS configuration for an encrypted broker URL, or
// nil for an unencrypted one. The key pair is loaded once here, so a wrong
// path fails at start, and again for every handshake.
func clientTLS(u *url.URL, o Options) (*tls.Config, error) {
	switch u.Scheme {
	case "ssl", "tls", "mqtts", "wss":
	default:
		if o.TLSCert != "" || o.TLSKey != "" || o.TLSCA != "" {
			return nil, fmt.Errorf("broker URL %q is not encrypted but TLS files are given; use ssl://%s", o.Broker, u.Host)
		}
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.TLSCA != "" {
		pem, err := os.ReadFile(o.TLSCA)
		if err != nil {
			return nil, fmt.Errorf("broker CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("broker CA %s holds no PEM certificate", o.TLSCA)
		}
		cfg.RootCAs = pool
	}
	if (o.TLSCert == "") != (o.TLSKey == "") {
		return nil, errors.New("a client certificate needs both its certificate and its key file")
	}
	if o.TLSCert != "" {
		load := func() (*tls.Certificate, error) {
			c, err := tls.LoadX509KeyPair(o.TLSCert, o.TLSKey)
			if err != nil {
				return nil, fmt.Errorf("device certificate %s / key %s: %w (issue one with `fleet certs device %s`)", o.TLSCert, o.TLSKey, err, o.DeviceID)
			}
			return &c, nil
		}
		c, err := load()
		if err != nil {
			return nil, err
		}
		// The broker takes the device id from the certificate and refuses
		// a client id that differs: say so now rather than retry forever.
		if leaf, err := x509.ParseCertificate(c.Certificate[0]); err == nil && leaf.Subject.CommonName != o.DeviceID {
			return nil, fmt.Errorf("device certificate %s is for %q, but this agent's id is %q; use that device's certificate or --id %s", o.TLSCert, leaf.Subject.CommonName, o.DeviceID, leaf.Subject.CommonName)
		}
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return load() }
	}
	return cfg, nil
}
