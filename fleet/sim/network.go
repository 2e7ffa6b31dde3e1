package sim

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Network shapes every simulated device's connection to the broker. The
// zero value is a perfect loopback network.
type Network struct {
	// Delay is added to every write, in each direction, so a round trip
	// takes 2×Delay longer.
	Delay time.Duration
	// Jitter adds up to this much more delay to each write, uniformly at
	// random. Writes stay in order, as on a TCP connection.
	Jitter time.Duration
	// Loss is the fraction of writes lost on the way. TCP turns a loss
	// into a retransmission, so a lost write arrives one retransmission
	// timeout late (max(200ms, 2×(Delay+Jitter)), as Linux's minimum RTO),
	// and everything after it on that connection waits behind it.
	Loss float64
}

// Validate checks the network's knobs.
func (n Network) Validate() error {
	if n.Delay < 0 || n.Jitter < 0 {
		return fmt.Errorf("network: delay %s and jitter %s must not be negative", n.Delay, n.Jitter)
	}
	if n.Delay > time.Minute || n.Jitter > time.Minute {
		return fmt.Errorf("network: delay %s and jitter %s must be under a minute; a longer one is an outage (use --offline)", n.Delay, n.Jitter)
	}
	if !(n.Loss >= 0 && n.Loss < 1) {
		return fmt.Errorf("network: loss %v must be in [0, 1)", n.Loss)
	}
	return nil
}

func (n Network) shaped() bool { return n.Delay > 0 || n.Jitter > 0 || n.Loss > 0 }

// rto is how late a lost write arrives.
func (n Network) rto() time.Duration { return max(200*time.Millisecond, 2*(n.Delay+n.Jitter)) }

// arrival returns when a write made now arrives, never before the write
// that went before it (last).
func (n Network) arrival(now, last time.Time) time.Time {
	at := now.Add(n.Delay)
	if n.Jitter > 0 {
		at = at.Add(rand.N(n.Jitter))
	}
	if n.Loss > 0 && rand.Float64() < n.Loss {
		at = at.Add(n.rto())
	}
	if at.Before(last) {
		at = last
	}
	return at
}

// errNetworkDown is what a device's dial returns while it is offline.
var errNetworkDown = errors.New("simulated network outage: the device is offline")

// errCut is what reads and writes return on a connection the simulated
// network cut. It must not read as net.ErrClosed: paho takes "use of
// closed network connection" for its own doing and goes quiet instead of
// reporting the connection lost (it would notice only at the next
// keep-alive, tens of seconds later).
var errCut = errors.New("simulated network outage: connection cut")

// tracker learns about the MQTT packets crossing a connection. Its
// methods run on the connection's reading or writing goroutine and must
// be quick.
type tracker interface {
	sent(c *conn, typ, flags byte, body []byte)
	received(c *conn, typ, flags byte, body []byte)
}

// conn is a simulated device's connection to the broker: the real TCP
// connection, seen through two framers that report every MQTT packet to a
// tracker, and shaped by a Network when one is set.
type conn struct {
	net.Conn
	in, out framer
	// wmu orders writes: paho writes from its keepalive goroutine and its
	// outgoing one, and the out framer must see the bytes as they go.
	wmu sync.Mutex
	sh  *shaper // nil: not shaped
	// onClose, if set, is called once when the connection closes.
	onClose   func(*conn)
	closeOnce sync.Once
	wasCut    atomic.Bool
}

func newConn(c net.Conn, t tracker, nw Network) *conn {
	w := &conn{Conn: c}
	w.in.onPacket = func(typ, flags byte, body []byte) { t.received(w, typ, flags, body) }
	w.out.onPacket = func(typ, flags byte, body []byte) { t.sent(w, typ, flags, body) }
	if nw.shaped() {
		w.sh = newShaper(c, nw)
	}
	return w
}

func (c *conn) Read(p []byte) (int, error) {
	var n int
	var err error
	if c.sh != nil {
		n, err = c.sh.read(p)
	} else {
		n, err = c.Conn.Read(p)
	}
	c.in.feed(p[:n])
	if err != nil && c.wasCut.Load() {
		err = errCut
	}
	return n, err
}

func (c *conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	// Seen before it is written: the broker's answer may be read before
	// Write returns, and must find its request already counted.
	c.out.feed(p)
	var n int
	var err error
	if c.sh != nil {
		n, err = c.sh.write(p)
	} else {
		n, err = c.Conn.Write(p)
	}
	if err != nil && c.wasCut.Load() {
		err = errCut
	}
	return n, err
}

// cut closes the connection as a network outage would: the agent sees
// an error that is not its own close.
func (c *conn) cut() {
	c.wasCut.Store(true)
	c.Close()
}

func (c *conn) Close() error {
	if c.sh != nil {
		c.sh.close()
	}
	err := c.Conn.Close()
	c.closeOnce.Do(func() {
		if c.onClose != nil {
			c.onClose(c)
		}
	})
	return err
}

func (c *conn) SetDeadline(t time.Time) error {
	if c.sh != nil {
		c.sh.readDL.Store(&t)
		c.sh.writeDL.Store(&t)
		return nil
	}
	return c.Conn.SetDeadline(t)
}

func (c *conn) SetReadDeadline(t time.Time) error {
	if c.sh != nil {
		c.sh.readDL.Store(&t)
		return nil
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *conn) SetWriteDeadline(t time.Time) error {
	if c.sh != nil {
		c.sh.writeDL.Store(&t)
		return nil
	}
	return c.Conn.SetWriteDeadline(t)
}

// chunk is bytes in flight on a shaped connection.
type chunk struct {
	at time.Time // when they arrive
	b  []byte
}

// shapeQueue bounds the chunks in flight per direction, like a socket
// buffer: a full queue blocks the writer.
const shapeQueue = 64

// shaper delays the two directions of a connection. Each direction is a
// queue of chunks stamped with their arrival time and a goroutine moving
// them: writes are queued at once and written to the socket when due;
// the socket is read ahead and reads are answered when the data is due.
// Both goroutines end when the connection closes.
type shaper struct {
	c  net.Conn
	nw Network

	wq       chan chunk
	rq       chan chunk
	closed   chan struct{}
	once     sync.Once
	readErr  error // set before rq is closed
	writeErr atomic.Pointer[error]
	readDL   atomic.Pointer[time.Time]
	writeDL  atomic.Pointer[time.Time]

	cur      chunk     // partly read chunk (reader's goroutine only)
	lastRead time.Time // arrival of the last chunk read ahead (readLoop only)
	lastW    time.Time // arrival of the last chunk written (writer only)
}

func newShaper(c net.Conn, nw Network) *shaper {
	s := &shaper{c: c, nw: nw, wq: make(chan chunk, shapeQueue), rq: make(chan chunk, shapeQueue), closed: make(chan struct{})}
	go s.writeLoop()
	go s.readLoop()
	return s
}

func (s *shaper) close() { s.once.Do(func() { close(s.closed) }) }

func (s *shaper) writeLoop() {
	for {
		select {
		case <-s.closed:
			return
		case ch := <-s.wq:
			if !sleepUntil(ch.at, s.closed, time.Time{}) {
				return
			}
			if _, err := s.c.Write(ch.b); err != nil {
				s.writeErr.Store(&err)
				s.close()
				s.c.Close()
				return
			}
		}
	}
}

func (s *shaper) readLoop() {
	defer close(s.rq)
	for {
		buf := make([]byte, 4<<10)
		n, err := s.c.Read(buf)
		if n > 0 {
			s.lastRead = s.nw.arrival(time.Now(), s.lastRead)
			select {
			case s.rq <- chunk{at: s.lastRead, b: buf[:n]}:
			case <-s.closed:
				s.readErr = net.ErrClosed
				return
			}
		}
		if err != nil {
			s.readErr = err
			return
		}
	}
}

func (s *shaper) write(p []byte) (int, error) {
	if e := s.writeErr.Load(); e != nil {
		return 0, *e
	}
	select {
	case <-s.closed:
		return 0, net.ErrClosed
	default:
	}
	s.lastW = s.nw.arrival(time.Now(), s.lastW)
	ch := chunk{at: s.lastW, b: append([]byte(nil), p...)}
	var timeout <-chan time.Time
	if dl := s.writeDL.Load(); dl != nil && !dl.IsZero() {
		t := time.NewTimer(time.Until(*dl))
		defer t.Stop()
		timeout = t.C
	}
	select {
	case s.wq <- ch:
		return len(p), nil
	case <-s.closed:
		return 0, net.ErrClosed
	case <-timeout:
		return 0, os.ErrDeadlineExceeded
	}
}

func (s *shaper) read(p []byte) (int, error) {
	var dl time.Time
	if d := s.readDL.Load(); d != nil {
		dl = *d
	}
	if len(s.cur.b) == 0 {
		var timeout <-chan time.Time
		if !dl.IsZero() {
			t := time.NewTimer(time.Until(dl))
			defer t.Stop()
			timeout = t.C
		}
		select {
		case ch, ok := <-s.rq:
			if !ok {
				return 0, s.readErr
			}
			s.cur = ch
		case <-s.closed:
			return 0, net.ErrClosed
		case <-timeout:
			return 0, os.ErrDeadlineExceeded
		}
	}
	if !sleepUntil(s.cur.at, s.closed, dl) {
		select {
		case <-s.closed:
			return 0, net.ErrClosed
		default:
			return 0, os.ErrDeadlineExceeded
		}
	}
	n := copy(p, s.cur.b)
	s.cur.b = s.cur.b[n:]
	return n, nil
}

// sleepUntil waits until at; it returns false if done closes or the
// deadline dl (if not zero) comes first.
func sleepUntil(at time.Time, done <-chan struct{}, dl time.Time) bool {
	wait := time.Until(at)
	if !dl.IsZero() && dl.Before(at) {
		wait = time.Until(dl)
		if wait <= 0 {
			return false
		}
		t := time.NewTimer(wait)
		defer t.Stop()
		select {
		case <-done:
		case <-t.C:
		}
		return false
	}
	if wait <= 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-done:
		return false
	case <-t.C:
		return true
	}
}

// dialer opens simulated devices' connections to the broker.
type dialer struct {
	nw Network
	d  net.Dialer
}

func (d *dialer) dial(ctx context.Context, addr string, t tracker) (*conn, error) {
	c, err := d.d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return newConn(c, t, d.nw), nil
}
