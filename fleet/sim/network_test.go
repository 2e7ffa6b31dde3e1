package sim

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

type countTracker struct {
	mu      sync.Mutex
	out, in []byte // packet types
}

func (c *countTracker) sent(_ *conn, typ, _ byte, _ []byte) {
	c.mu.Lock()
	c.out = append(c.out, typ)
	c.mu.Unlock()
}

func (c *countTracker) received(_ *conn, typ, _ byte, _ []byte) {
	c.mu.Lock()
	c.in = append(c.in, typ)
	c.mu.Unlock()
}

// pair returns a simulated connection and the server's end of it.
func pair(t *testing.T, nw Network) (*conn, net.Conn, *countTracker) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	tr := &countTracker{}
	d := &dialer{nw: nw}
	c, err := d.dial(context.Background(), ln.Addr().String(), tr)
	if err != nil {
		t.Fatal(err)
	}
	srv := <-accepted
	if srv == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); srv.Close() })
	return c, srv, tr
}

func TestConnCountsPackets(t *testing.T) {
	for _, nw := range []Network{{}, {Delay: time.Millisecond, Jitter: time.Millisecond, Loss: 0.1}} {
		c, srv, tr := pair(t, nw)
		out := append(packet(pktPublish, 2, publishBody("ef/v1/dev/a/state", 1, []byte("x"))), packet(12, 0, nil)...)
		if _, err := c.Write(out); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(out))
		srv.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(srv, got); err != nil || !bytes.Equal(got, out) {
			t.Fatalf("%+v: server read %x, %v; want %x", nw, got, err, out)
		}
		in := packet(pktPuback, 0, []byte{0, 1})
		srv.Write(in)
		back := make([]byte, len(in))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(c, back); err != nil || !bytes.Equal(back, in) {
			t.Fatalf("%+v: client read %x, %v", nw, back, err)
		}
		tr.mu.Lock()
		if !bytes.Equal(tr.out, []byte{pktPublish, 12}) || !bytes.Equal(tr.in, []byte{pktPuback}) {
			t.Errorf("%+v: tracker saw sent %v received %v", nw, tr.out, tr.in)
		}
		tr.mu.Unlock()
	}
}

// Delay holds each direction back, jitter does not reorder, and the
// data arrives whole.
func TestShapedConnDelaysInOrder(t *testing.T) {
	const delay = 30 * time.Millisecond
	c, srv, _ := pair(t, Network{Delay: delay, Jitter: 20 * time.Millisecond})
	var want []byte
	start := time.Now()
	for i := range shapeQueue - 4 { // no more than the queue holds: writes must not wait
		b := bytes.Repeat([]byte{byte(i)}, 1+i%50)
		want = append(want, b...)
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
	}
	if took := time.Since(start); took > delay {
		t.Errorf("writes took %s: they should queue, not wait for the delay", took)
	}
	got := make([]byte, len(want))
	srv.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(srv, got); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < delay {
		t.Errorf("data arrived after %s, before the %s delay", took, delay)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("data arrived reordered or changed")
	}

	// The other direction: the client sees the server's bytes late.
	start = time.Now()
	srv.Write([]byte("pong"))
	b := make([]byte, 4)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "pong" {
		t.Fatalf("read %q, %v", b, err)
	}
	if took := time.Since(start); took < delay {
		t.Errorf("reply arrived after %s, before the %s delay", took, delay)
	}
}

// A read deadline ends a read waiting for delayed data without losing
// that data; closing ends it at once.
func TestShapedConnDeadlineAndClose(t *testing.T) {
	c, srv, _ := pair(t, Network{Delay: 300 * time.Millisecond})
	srv.Write([]byte("late"))
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	b := make([]byte, 4)
	_, err := c.Read(b)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read before the data is due: %v, want a timeout", err)
	}
	c.SetReadDeadline(time.Time{})
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "late" {
		t.Fatalf("read after the timeout: %q, %v; the data must not be lost", b, err)
	}

	done := make(chan error, 1)
	go func() { _, err := c.Read(b); done <- err }()
	time.Sleep(20 * time.Millisecond)
	c.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("read on a closed connection succeeded")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Close did not end a blocked Read")
	}
	if _, err := c.Write([]byte("x")); err == nil {
		t.Fatal("write on a closed connection succeeded")
	}
}

// Loss makes some writes one RTO late.
func TestShapedConnLoss(t *testing.T) {
	nw := Network{Loss: 0.5}
	late := 0
	now := time.Now()
	var last time.Time
	for range 1000 {
		at := nw.arrival(now, last)
		if at.Sub(now) >= nw.rto() {
			late++
		}
	}
	if late < 400 || late > 600 {
		t.Fatalf("%d of 1000 writes were late with loss 0.5", late)
	}
	// And it holds later writes behind a late one.
	if at := nw.arrival(now, now.Add(time.Second)); at.Before(now.Add(time.Second)) {
		t.Fatal("a write overtook the one before it")
	}
}

func TestNetworkValidate(t *testing.T) {
	for _, nw := range []Network{{Delay: -1}, {Jitter: -1}, {Loss: 1}, {Loss: -0.1}, {Delay: 2 * time.Minute}} {
		if err := nw.Validate(); err == nil {
			t.Errorf("%+v: no error", nw)
		}
	}
	if err := (Network{Delay: time.Second, Loss: 0.5}).Validate(); err != nil {
		t.Error(err)
	}
}
