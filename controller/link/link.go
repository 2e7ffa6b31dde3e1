// Package link is the controller's MQTT client: one paho connection to the
// broker (embedded or external) with a persistent session, QoS 1 and
// automatic reconnects. It subscribes to every device's uplink topics,
// opens each payload with wire.Open, and hands well-formed envelopes to a
// Handler; it also publishes the controller's downlink messages.
//
// Paho delivers messages in order on one goroutine and sends the PUBACK
// when the callback returns; a callback that blocks stalls the whole
// connection, keepalives included. So the callback only copies the message
// into a bounded queue, and a worker owned by Run opens and handles it. When
// the queue is full the callback waits: that pushes back on the broker
// instead of dropping QoS 1 messages the broker believes delivered. A
// message still queued when the controller dies is lost to it; that is
// safe for every kind: telemetry is resent until acked, state and presence
// are retained, hello comes again on the next connect.
//
// With the embedded broker (Options.Inline) device messages do not go
// through a client session at all: the broker hands each one to the link
// on the publishing device's own connection goroutine, and a full queue
// holds that device back. A session's bounded outbound queue, where a
// broker drops what does not fit when its subscriber falls behind, is not
// in the path; the MQTT client then only publishes.
package link

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/edgefleet/edgefleet/controller/metrics"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"github.com/edgefleet/edgefleet/proto/wire/pahostore"
	"golang.org/x/sync/errgroup"
)

// DefaultClientID is the controller's MQTT client id. It is fixed so the
// broker keeps the controller's session (subscriptions and queued QoS 1
// messages) while it restarts.
const DefaultClientID = "edgefleet-controller"

// UplinkKinds are the device-to-controller topics the link subscribes to.
var UplinkKinds = []wire.Kind{wire.KindHello, wire.KindState, wire.KindPresence, wire.KindEvents, wire.KindTelemetry}

// Message is one well-formed message from a device.
type Message struct {
	Topic    string
	DeviceID string
	Kind     wire.Kind
	Envelope *pb.Envelope
	// Payload is the envelope as received.
	Payload []byte
	// Batch, with Options.LazyTelemetry, is a plain telemetry message's
	// TelemetryBatch still serialized (Envelope has only the header); a
	// compressed one is in Envelope.telemetry_zstd as always.
	Batch []byte
	// Retained is set when the broker replayed a retained message on
	// subscribe, rather than forwarding a fresh publish.
	Retained bool
	// Received is when the link took the message off the wire.
	Received time.Time
}

// Handler handles messages from devices. HandleMessage runs on the link's
// worker, one message at a time in arrival order. An error is logged with
// the device and topic; the message is not redelivered.
type Handler interface {
	HandleMessage(ctx context.Context, m Message) error
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, m Message) error

// HandleMessage calls f.
func (f HandlerFunc) HandleMessage(ctx context.Context, m Message) error { return f(ctx, m) }

// Options configure a Link.
type Options struct {
	// Broker is the broker URL, e.g. tcp://127.0.0.1:1883.
	Broker string
	// ClientID defaults to DefaultClientID.
	ClientID string
	Handler  Handler
	Logger   *slog.Logger
	// Metrics receives the link's counters; nil keeps them private.
	Metrics *metrics.Registry
	// QueueSize bounds the messages waiting for the worker (default 1024).
	QueueSize int
	// PublishTimeout bounds the wait for the broker's PUBACK (default 10s).
	PublishTimeout time.Duration
	// ConnectTimeout bounds one connection attempt, CONNACK included
	// (default 10s).
	ConnectTimeout time.Duration
	// OnConnect runs on a goroutine owned by Run after every (re)connect,
	// once the subscriptions are in place: the place to re-publish what
	// the broker may not have received.
	OnConnect func(ctx context.Context)
	// Now is the clock (default time.Now).
	Now func() time.Time
	// TLS is used for ssl://, tls:// and mqtts:// brokers: the
	// controller's client certificate and the CA of the broker's
	// certificate (see ClientTLS).
	TLS *tls.Config
	// LazyTelemetry leaves telemetry batches undecoded (see Message.Batch
	// and openTelemetry): the telemetry ingest decodes them faster.
	LazyTelemetry bool
	// Username and Password are sent in CONNECT when Username is set: the
	// embedded broker's internal listener admits the controller's link
	// with them (broker.Broker.InternalCredentials).
	Username, Password string
	// Inline, when set, delivers device messages in process (the embedded
	// broker) instead of through subscriptions of the MQTT client.
	Inline InlineSubscriber
}

// InlineSubscriber delivers the messages published on a topic filter in
// process: the embedded broker (broker.Broker.SubscribeInline).
type InlineSubscriber interface {
	// SubscribeInline calls deliver for every message published on
	// filter from now on, and first for the retained ones (retained set),
	// on the publisher's goroutine; deliver may block, which holds the
	// publisher back. payload is the broker's own copy of the message,
	// which nothing changes afterwards (mochi reads each packet into bytes
	// of its own): deliver may keep it.
	SubscribeInline(filter string, deliver func(topic string, payload []byte, retained bool)) error
}

// Link is the controller's connection to the broker.
type Link struct {
	opts     Options
	log      *slog.Logger
	client   paho.Client
	queue    chan inbound
	pending  chan pendingPublish
	connects chan struct{}
	stopping chan struct{}
	stopOnce sync.Once
	// ready is closed after the first successful subscribe.
	ready     chan struct{}
	readyOnce sync.Once

	connected atomic.Bool

	received  *metrics.CounterVec
	malformed *metrics.CounterVec
	oversized *metrics.CounterVec
	published *metrics.CounterVec
	pubFailed *metrics.CounterVec
}

type inbound struct {
	topic    string
	payload  []byte
	retained bool
	at       time.Time
}

type pendingPublish struct {
	topic    string
	tok      paho.Token
	deadline time.Time
	done     func(error)
}

// New checks the options and builds a link; Run connects it.
func New(opts Options) (*Link, error) {
	u, err := url.Parse(opts.Broker)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("broker URL %q: want a URL such as tcp://127.0.0.1:1883", opts.Broker)
	}
	switch u.Scheme {
	case "tcp", "mqtt", "ws":
		if opts.TLS != nil {
			return nil, fmt.Errorf("broker URL %q: TLS settings are given but %s:// is not encrypted; use ssl://%s", opts.Broker, u.Scheme, u.Host)
		}
	case "ssl", "tls", "mqtts", "wss":
	default:
		return nil, fmt.Errorf("broker URL %q: scheme %q is not one of tcp, mqtt, ssl, tls, mqtts, ws, wss", opts.Broker, u.Scheme)
	}
	if opts.Handler == nil {
		return nil, errors.New("link: no message handler")
	}
	if opts.ClientID == "" {
		opts.ClientID = DefaultClientID
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Metrics == nil {
		opts.Metrics = metrics.NewRegistry()
	}
	if opts.QueueSize <= 0 {
		opts.QueueSize = 1024
	}
	if opts.PublishTimeout <= 0 {
		opts.PublishTimeout = 10 * time.Second
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	l := &Link{
		opts:      opts,
		log:       opts.Logger,
		queue:     make(chan inbound, opts.QueueSize),
		pending:   make(chan pendingPublish, 4096),
		connects:  make(chan struct{}, 1),
		stopping:  make(chan struct{}),
		ready:     make(chan struct{}),
		received:  opts.Metrics.CounterVec("edgefleet_controller_mqtt_messages_received_total", "Well-formed MQTT messages received from devices, by kind.", "kind"),
		malformed: opts.Metrics.CounterVec("edgefleet_controller_mqtt_messages_malformed_total", "MQTT messages dropped because they failed wire.Open (bad protobuf, oversize, wrong device or kind), by topic kind.", "kind"),
		oversized: opts.Metrics.CounterVec("edgefleet_controller_mqtt_messages_oversized_total", "MQTT messages dropped unread for being over wire.MaxPayload (counted in malformed too), by topic kind.", "kind"),
		published: opts.Metrics.CounterVec("edgefleet_controller_mqtt_messages_published_total", "MQTT messages published, by kind: acknowledged by the broker (QoS 1) or written to the connection (QoS 0, telemetry acks).", "kind"),
		pubFailed: opts.Metrics.CounterVec("edgefleet_controller_mqtt_publish_failures_total", "MQTT publishes that failed or were not acknowledged in time, by kind.", "kind"),
	}
	opts.Metrics.GaugeFunc("edgefleet_controller_mqtt_queue_depth", "Messages received and waiting to be handled.", func() float64 { return float64(len(l.queue)) })
	opts.Metrics.GaugeFunc("edgefleet_controller_mqtt_connected", "1 while the controller is connected to the broker.", func() float64 {
		if l.connected.Load() {
			return 1
		}
		return 0
	})
	po := paho.NewClientOptions().
		AddBroker(opts.Broker).
		SetClientID(opts.ClientID).
		// MQTT 3.1.1, the version DESIGN.md requires of brokers; without it
		// paho falls back to 3.1 on a failed connect, which only muddies
		// the broker's logs.
		SetProtocolVersion(4).
		SetCleanSession(false).
		SetStore(pahostore.New()).
		SetOrderMatters(true).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(time.Second).
		SetMaxReconnectInterval(30 * time.Second).
		SetKeepAlive(30 * time.Second).
		SetConnectTimeout(opts.ConnectTimeout).
		SetWriteTimeout(opts.PublishTimeout).
		SetDefaultPublishHandler(l.onMessage).
		SetOnConnectHandler(l.onConnect).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			l.connected.Store(false)
			l.log.Warn("mqtt connection lost; reconnecting", "broker", opts.Broker, "err", err)
		})
	if opts.TLS != nil {
		po.SetTLSConfig(opts.TLS)
	}
	if opts.Username != "" {
		po.SetUsername(opts.Username).SetPassword(opts.Password)
	}
	l.client = paho.NewClient(po)
	return l, nil
}

// Run connects to the broker and handles messages until ctx ends. It keeps
// retrying while the broker is unreachable.
func (l *Link) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case m := <-l.queue:
				l.dispatch(ctx, m)
			}
		}
	})
	if l.opts.Inline != nil {
		// Subscribed once, before the client connects: the broker
		// delivers retained messages during the call, to the worker
		// already running.
		for _, k := range UplinkKinds {
			if err := l.opts.Inline.SubscribeInline(wire.AllDevices(k), l.deliver); err != nil {
				l.stopOnce.Do(func() { close(l.stopping) })
				cancel()
				_ = g.Wait()
				return fmt.Errorf("subscribe to %s in the embedded broker: %w", wire.AllDevices(k), err)
			}
		}
	}
	l.log.Info("connecting to mqtt broker", "broker", l.opts.Broker, "client", l.opts.ClientID)
	// With ConnectRetry the token completes only once connected; the
	// retries run inside paho.
	l.client.Connect()
	g.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-l.connects:
				if l.opts.OnConnect != nil {
					l.opts.OnConnect(ctx)
				}
			}
		}
	})
	g.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case p := <-l.pending:
				p.done(l.wait(ctx, p.topic, p.tok, p.deadline))
			}
		}
	})
	<-ctx.Done()
	l.stopOnce.Do(func() { close(l.stopping) })
	err := g.Wait()
	l.client.Disconnect(250)
	l.connected.Store(false)
	// Publishes whose completion nobody will wait for any more still get
	// their callbacks, so callers never wait forever.
	for {
		select {
		case p := <-l.pending:
			p.done(fmt.Errorf("publish to %s: controller shutting down", p.topic))
		default:
			l.log.Info("mqtt link stopped")
			return err
		}
	}
}

// Ready is closed once the link has connected and subscribed for the first
// time: from then on no device message is missed.
func (l *Link) Ready() <-chan struct{} { return l.ready }

// Connected reports whether the link is connected to the broker now.
func (l *Link) Connected() bool { return l.connected.Load() }

// onConnect runs on a paho goroutine after each (re)connect.
func (l *Link) onConnect(c paho.Client) {
	if l.opts.Inline == nil && !l.subscribe(c) {
		return
	}
	l.connected.Store(true)
	l.readyOnce.Do(func() { close(l.ready) })
	l.log.Info("mqtt connected and subscribed", "broker", l.opts.Broker, "inline", l.opts.Inline != nil)
	select {
	case l.connects <- struct{}{}:
	default: // a re-publish pass is already due
	}
}

// subscribe subscribes the client to every device's uplink topics.
func (l *Link) subscribe(c paho.Client) bool {
	filters := make(map[string]byte, len(UplinkKinds))
	for _, k := range UplinkKinds {
		filters[wire.AllDevices(k)] = 1
	}
	// Subscribing again on every connect covers brokers that lost the
	// persistent session (an embedded broker that restarted, an external
	// one without persistence).
	tok := c.SubscribeMultiple(filters, l.onMessage)
	if !tok.WaitTimeout(l.opts.PublishTimeout) || tok.Error() != nil {
		l.log.Error("mqtt subscribe failed; will retry on the next reconnect", "broker", l.opts.Broker, "err", tok.Error())
		return false
	}
	return true
}

// onMessage runs on paho's delivery goroutine: it only queues.
func (l *Link) onMessage(_ paho.Client, m paho.Message) {
	l.deliver(m.Topic(), m.Payload(), m.Retained())
}

// deliver queues a message for the worker; it waits while the queue is
// full, until the link stops. payload is kept as it is, not copied: paho
// and the embedded broker both read each message into bytes of its own.
func (l *Link) deliver(topic string, payload []byte, retained bool) {
	in := inbound{topic: topic, payload: payload, retained: retained, at: l.opts.Now()}
	select {
	case l.queue <- in:
	case <-l.stopping:
	}
}

// dispatch opens one message and hands it to the handler.
func (l *Link) dispatch(ctx context.Context, in inbound) {
	if len(in.payload) == 0 {
		// A cleared retained topic: nothing to handle.
		return
	}
	var env *pb.Envelope
	var batch []byte
	var err error
	if _, k, _ := wire.ParseTopic(in.topic); l.opts.LazyTelemetry && k == wire.KindTelemetry {
		env, batch, err = openTelemetry(in.topic, in.payload)
	} else {
		env, err = wire.Open(in.topic, in.payload)
	}
	if err != nil {
		id, kind, _ := wire.ParseTopic(in.topic)
		label := string(kind)
		if label == "" {
			label = "unknown"
		}
		l.malformed.With(label).Inc()
		if errors.Is(err, wire.ErrTooLarge) {
			l.oversized.With(label).Inc()
		}
		l.log.Warn("dropped malformed mqtt message", "device", id, "topic", in.topic, "bytes", len(in.payload), "err", err)
		return
	}
	id, kind, _ := wire.ParseTopic(in.topic) // Open checked the topic
	l.received.With(string(kind)).Inc()
	m := Message{Topic: in.topic, DeviceID: id, Kind: kind, Envelope: env, Payload: in.payload, Batch: batch, Retained: in.retained, Received: in.at}
	if err := l.opts.Handler.HandleMessage(ctx, m); err != nil && ctx.Err() == nil {
		l.log.Error("handle mqtt message", "device", id, "topic", in.topic, "err", err)
	}
}

// Publish publishes payload with QoS 1 and waits until the broker
// acknowledges it, ctx ends, or the publish timeout passes. A publish that
// timed out may still be delivered later: paho keeps it in the session and
// resends it after a reconnect.
func (l *Link) Publish(ctx context.Context, topic string, payload []byte, retained bool) error {
	tok := l.client.Publish(topic, 1, retained, payload)
	return l.wait(ctx, topic, tok, l.opts.Now().Add(l.opts.PublishTimeout))
}

// PublishAsync publishes payload with QoS 1 and calls done with the outcome
// from a goroutine owned by Run, once the broker acknowledged it or the
// publish timeout passed. done must not block for long.
func (l *Link) PublishAsync(topic string, payload []byte, retained bool, done func(error)) {
	tok := l.client.Publish(topic, 1, retained, payload)
	p := pendingPublish{topic: topic, tok: tok, deadline: l.opts.Now().Add(l.opts.PublishTimeout), done: done}
	select {
	case l.pending <- p:
	case <-l.stopping:
		done(fmt.Errorf("publish to %s: controller shutting down", topic))
	}
}

// PublishAtMostOnce publishes payload with QoS 0: neither the broker nor
// the device acknowledges it, and a device offline does not get it. For
// messages whose loss the receiver repairs by itself, such as telemetry
// acks (an agent resends what is not acked). It does not wait; a publish
// that cannot even start (the link is down) returns its error.
func (l *Link) PublishAtMostOnce(topic string, payload []byte) error {
	tok := l.client.Publish(topic, 0, false, payload)
	_, kind, _ := wire.ParseTopic(topic)
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			l.pubFailed.With(string(kind)).Inc()
			return fmt.Errorf("publish to %s: %w", topic, err)
		}
	default:
	}
	l.published.With(string(kind)).Inc()
	return nil
}

func (l *Link) wait(ctx context.Context, topic string, tok paho.Token, deadline time.Time) error {
	_, kind, _ := wire.ParseTopic(topic)
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	var err error
	select {
	case <-tok.Done():
		err = tok.Error()
		if err != nil {
			err = fmt.Errorf("publish to %s: %w", topic, err)
		}
	case <-timer.C:
		err = fmt.Errorf("publish to %s: the broker did not acknowledge it within %s (it stays queued and is resent after a reconnect)", topic, l.opts.PublishTimeout)
	case <-ctx.Done():
		err = fmt.Errorf("publish to %s: %w", topic, ctx.Err())
	}
	if err != nil {
		l.pubFailed.With(string(kind)).Inc()
		return err
	}
	l.published.With(string(kind)).Inc()
	return nil
}

// ClientTLS loads the controller's TLS client settings for an external
// broker: its certificate and key (CN edgefleet-controller, from `fleet
// certs init`), which the broker's ACL grants every topic, and the CA that
// signed the broker's certificate. An empty caFile trusts the system's CAs.
func ClientTLS(certFile, keyFile, caFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if certFile != "" || keyFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate %s / key %s: %w (create them with `fleet certs init`)", certFile, keyFile, err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("broker CA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("broker CA %s holds no PEM certificate", caFile)
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}
