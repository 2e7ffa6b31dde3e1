package link

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/brokertest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
)

func TestBackoff(t *testing.T) {
	const min, max = time.Second, 60 * time.Second
	cases := []struct {
		n    int
		r    float64
		want time.Duration
	}{
		{0, 0, 500 * time.Millisecond},
		{0, 0.999999, time.Second},
		{1, 0, time.Second},
		{3, 0.5, 6 * time.Second},
		{5, 0, 16 * time.Second}, // 32s nominal, of which half is fixed
		{6, 0, 30 * time.Second}, // 64s nominal, capped at 60s
		{7, 1, 60 * time.Second},
		{1000, 0.5, 45 * time.Second},
	}
	for _, c := range cases {
		if got := Backoff(c.n, min, max, c.r); got.Round(time.Millisecond) != c.want {
			t.Errorf("Backoff(%d, r=%v) = %v, want %v", c.n, c.r, got, c.want)
		}
	}
	// Jitter spreads agents out: different r, different delays.
	if Backoff(4, min, max, 0.1) == Backoff(4, min, max, 0.9) {
		t.Error("no jitter")
	}
}

// recorder collects what the link hands to the agent.
type recorder struct {
	mu       sync.Mutex
	got      []*pb.Envelope
	kinds    []wire.Kind
	notify   chan struct{}
	connects atomic.Int32
	lost     atomic.Int32
}

func newRecorder() *recorder { return &recorder{notify: make(chan struct{}, 100)} }

func (r *recorder) handle(k wire.Kind, env *pb.Envelope) {
	r.mu.Lock()
	r.got = append(r.got, env)
	r.kinds = append(r.kinds, k)
	r.mu.Unlock()
	r.notify <- struct{}{}
}

func (r *recorder) wait(t *testing.T, n int) []*pb.Envelope {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		r.mu.Lock()
		got := append([]*pb.Envelope(nil), r.got...)
		r.mu.Unlock()
		if len(got) >= n {
			return got
		}
		select {
		case <-r.notify:
		case <-deadline:
			t.Fatalf("got %d messages, want %d", len(got), n)
		}
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// cuttableDialer dials the real broker and lets the test cut the live
// connection or refuse new ones.
type cuttableDialer struct {
	mu     sync.Mutex
	conns  []*cutConn
	refuse bool
	dials  atomic.Int32
}

func (d *cuttableDialer) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.dials.Add(1)
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.refuse {
		return nil, errors.New("network down (test)")
	}
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	cc := &cutConn{Conn: c}
	d.conns = append(d.conns, cc)
	return cc, nil
}

// cutConn fails like a dropped network link. (A plain Close would look
// to paho like a deliberate disconnect, which it does not report.)
type cutConn struct {
	net.Conn
	dead atomic.Bool
}

var errCut = errors.New("connection reset (test)")

func (c *cutConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if c.dead.Load() {
		return 0, errCut
	}
	return n, err
}

func (c *cutConn) Write(p []byte) (int, error) {
	if c.dead.Load() {
		return 0, errCut
	}
	return c.Conn.Write(p)
}

func (c *cutConn) Close() error {
	c.dead.Store(true)
	return c.Conn.Close()
}

func (d *cuttableDialer) cut(refuse bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.refuse = refuse
	for _, c := range d.conns {
		c.dead.Store(true)
		c.Conn.Close()
	}
	d.conns = nil
}

func startLink(t *testing.T, o Options) (*Link, *recorder, func()) {
	t.Helper()
	rec := newRecorder()
	o.Handle = rec.handle
	o.OnConnect = func(context.Context) { rec.connects.Add(1) }
	o.OnDisconnect = func() { rec.lost.Add(1) }
	if o.MinBackoff == 0 {
		o.MinBackoff, o.MaxBackoff = 10*time.Millisecond, 50*time.Millisecond
	}
	o.ConnectTimeout = 2 * time.Second
	o.Logger = slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	l, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	var once sync.Once
	stop := func() { once.Do(func() { stopRun(t, cancel, done) }) }
	t.Cleanup(stop)
	return l, rec, stop
}

func stopRun(t *testing.T, cancel func(), done chan error) {
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Error("Run did not return after cancel")
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func presence(online bool) func(brokertest.Message) bool {
	return func(m brokertest.Message) bool {
		return m.Env != nil && m.Env.GetPresence() != nil && m.Env.GetPresence().GetOnline() == online
	}
}

func TestLinkDeliversAndDropsMalformed(t *testing.T) {
	b := brokertest.Start(t)
	ctl := b.Controller(t)
	l, rec, _ := startLink(t, Options{Broker: b.URL(), DeviceID: "dev-1"})

	ctl.WaitFor(5*time.Second, "presence online", presence(true))
	waitUntil(t, "OnConnect", func() bool { return rec.connects.Load() == 1 })
	if !l.Connected() {
		t.Fatal("not connected after OnConnect")
	}

	other, _ := wire.Seal("dev-2", time.Now(), &pb.Command{Name: "resync"})
	ackAsCmd, _ := wire.Seal("dev-1", time.Now(), &pb.TelemetryAck{SpoolEpoch: "e"})
	bad := []struct {
		topic    string
		payload  []byte
		retained bool
	}{
		{wire.Topic("dev-1", wire.KindDesired), []byte("not protobuf \xff\xff"), true},
		{wire.Topic("dev-1", wire.KindAck), []byte{0x0a, 0xff}, false},
		{wire.Topic("dev-1", wire.KindCmd), other, false},
		{wire.Topic("dev-1", wire.KindCmd), ackAsCmd, false},
		{wire.Topic("dev-1", wire.KindCmd), make([]byte, wire.MaxPayload+1), false},
	}
	for _, m := range bad {
		ctl.SendRaw(m.topic, m.payload, m.retained)
	}
	// An empty retained payload clears the topic and is ignored, not counted.
	ctl.SendRaw(wire.Topic("dev-1", wire.KindDesired), nil, true)
	// Then valid messages on each topic: they arrive, in order, after the
	// bad ones were dropped.
	ctl.Send("dev-1", wire.KindCmd, &pb.Command{Name: "diagnostics"})
	ctl.Send("dev-1", wire.KindAck, &pb.TelemetryAck{SpoolEpoch: "e1"})
	ctl.Send("dev-1", wire.KindDesired, &pb.SignedDesiredState{KeyId: "k"})
	ctl.Send("dev-1", wire.KindKeys, &pb.KeyAnnouncements{Announcements: []*pb.SignedKeyAnnouncement{{KeyId: "a"}}})
	got := rec.wait(t, 4)
	if len(got) != 4 || got[0].GetCommand().GetName() != "diagnostics" || got[1].GetAck().GetSpoolEpoch() != "e1" || got[2].GetDesired().GetKeyId() != "k" ||
		got[3].GetKeys().GetAnnouncements()[0].GetKeyId() != "a" {
		t.Fatalf("handled %v", got)
	}
	if rec.kinds[0] != wire.KindCmd || rec.kinds[1] != wire.KindAck || rec.kinds[2] != wire.KindDesired || rec.kinds[3] != wire.KindKeys {
		t.Fatalf("kinds %v", rec.kinds)
	}
	if n := l.Stats().Malformed; n != uint64(len(bad)) {
		t.Fatalf("malformed = %d, want %d", n, len(bad))
	}
	// The oversized payload was dropped unread and counted as such.
	if n := l.Stats().Oversized; n != 1 {
		t.Fatalf("oversized = %d, want 1", n)
	}
	// Publishing works both ways.
	if err := l.Publish(t.Context(), wire.KindEvents, &pb.Event{Kind: pb.EventKind_EVENT_KIND_HEALTHY}); err != nil {
		t.Fatal(err)
	}
	ctl.WaitFor(5*time.Second, "event", brokertest.Kind("dev-1", wire.KindEvents))
}

func TestLinkReconnectsWithWillAndSession(t *testing.T) {
	b := brokertest.Start(t)
	ctl := b.Controller(t)
	d := &cuttableDialer{}
	l, rec, stop := startLink(t, Options{Broker: b.URL(), DeviceID: "dev-1", Dial: d.Dial})
	ctl.WaitFor(5*time.Second, "presence online", presence(true))
	waitUntil(t, "first connect", func() bool { return rec.connects.Load() == 1 })

	// Cut the network: the broker publishes the last will (offline,
	// retained) and the link keeps trying, with backoff.
	d.cut(true)
	ctl.WaitFor(10*time.Second, "last will", presence(false))
	waitUntil(t, "disconnect noticed", func() bool { return rec.lost.Load() == 1 && !l.Connected() })
	if err := l.Publish(t.Context(), wire.KindEvents, &pb.Event{}); !errors.Is(err, ErrOffline) {
		t.Fatalf("publish while offline: %v, want ErrOffline", err)
	}
	dials := d.dials.Load()
	waitUntil(t, "retries", func() bool { return d.dials.Load() >= dials+3 })

	// A command sent while the device is away waits in its persistent
	// session and arrives after the reconnect.
	ctl.Send("dev-1", wire.KindCmd, &pb.Command{Name: "resync"})
	d.cut(false)
	waitUntil(t, "reconnect", func() bool { return rec.connects.Load() == 2 })
	got := rec.wait(t, 1)
	if got[0].GetCommand().GetName() != "resync" {
		t.Fatalf("queued command = %v", got[0])
	}
	if n := ctl.Count(presence(true)); n < 2 {
		t.Fatalf("presence online published %d times, want one per connect", n)
	}

	// A clean stop says offline itself (the will only fires on a cut).
	before := ctl.Count(presence(false))
	stop()
	ctl.WaitFor(5*time.Second, "presence offline on stop", func(m brokertest.Message) bool {
		return presence(false)(m) && ctl.Count(presence(false)) > before
	})
}

func TestLinkSurvivesBrokerRestart(t *testing.T) {
	b := brokertest.Start(t)
	_, rec, _ := startLink(t, Options{Broker: b.URL(), DeviceID: "dev-1"})
	waitUntil(t, "connect", func() bool { return rec.connects.Load() == 1 })
	b.Close()
	waitUntil(t, "loss", func() bool { return rec.lost.Load() == 1 })
	b2 := brokertest.StartAt(t, b.Addr)
	waitUntil(t, "reconnect", func() bool { return rec.connects.Load() == 2 })
	ctl := b2.Controller(t)
	ctl.WaitFor(5*time.Second, "retained presence on the new broker", presence(true))
}

func TestNewRefusesBadOptions(t *testing.T) {
	for _, o := range []Options{
		{Broker: "tcp://127.0.0.1:1883", DeviceID: "bad id"},
		{Broker: "nonsense", DeviceID: "dev"},
	} {
		if _, err := New(o); err == nil {
			t.Errorf("New(%+v) accepted", o)
		}
	}
}

// TestPublishesAcrossCuts keeps several publishers busy while the network
// drops again and again, so publishes are left waiting in paho when a
// connection dies and the next connection resumes the session under them.
// Run with -race: paho handed one publish packet to both the new
// connection's writer and its resume, a race the link's store
// (pahostore) removes.
func TestPublishesAcrossCuts(t *testing.T) {
	b := brokertest.Start(t)
	d := &cuttableDialer{}
	l, rec, _ := startLink(t, Options{Broker: b.URL(), DeviceID: "dev-1", Dial: d.Dial})
	waitUntil(t, "connect", func() bool { return rec.connects.Load() == 1 })

	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	var published atomic.Int64
	for range 4 {
		wg.Go(func() {
			for ctx.Err() == nil {
				pctx, pcancel := context.WithTimeout(ctx, 200*time.Millisecond)
				if l.Publish(pctx, wire.KindEvents, &pb.Event{Detail: "x"}) == nil {
					published.Add(1)
				}
				pcancel()
			}
		})
	}
	const cuts = 15
	for i := range cuts {
		before := published.Load()
		waitUntil(t, "publishes on this connection", func() bool { return published.Load() > before+20 })
		d.cut(false)
		waitUntil(t, "reconnect", func() bool { return rec.connects.Load() >= int32(i+2) })
	}
	cancel()
	wg.Wait()
	t.Logf("%d publishes acknowledged over %d connections", published.Load(), rec.connects.Load())
}
