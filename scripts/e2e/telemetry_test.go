package e2e

import (
	"bufio"
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/controller/store"
	"github.com/edgefleet/edgefleet/fleet/client"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/scripts/internal/proc"
)

// The telemetry guarantee these tests check, stated once:
//
//   - A record is committed when the spool transaction holding it commits.
//     Seqs come from SQLite AUTOINCREMENT, and a transaction that does not
//     commit gives its seqs back, so the committed records of a spool are
//     exactly seqs 1..LastSeq of its epoch (the bound dropped none here).
//   - Every committed record ends up in the controller's store exactly
//     once: COUNT(*) = LastSeq, all seqs in 1..LastSeq, one epoch.
//   - An answered inference request has had its record queued, not yet
//     committed: SIGKILL loses at most the queue's not-yet-written tail
//     (QueueOptions.Capacity plus one batch) per kill, and never a
//     committed record.
const (
	queueCapacity = 8192 // spool.QueueOptions default
	queueBatch    = 256
)

// telemetryAgentConfig gives the agent a short health watch, so the model
// is healthy before the kills start (three unclean starts during a watch
// would roll it back).
func telemetryAgentConfig(t *testing.T, f *fleet) func(string) []string {
	path := filepath.Join(f.dir, "agent.yaml")
	if err := os.WriteFile(path, []byte("health:\n  watch: 1s\n  min_inferences: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return func(string) []string { return []string{"--config", path} }
}

// producer posts one-row inference requests to an agent from a few
// goroutines, riding out the agent's deaths, until answered reaches target.
type producer struct {
	url       string
	target    int64
	answered  atomic.Int64
	attempted atomic.Int64
	hc        *http.Client
}

func newProducer(listen string, target int64) *producer {
	return &producer{url: "http://" + listen + "/v2/models/grid-anomaly/infer", target: target,
		hc: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}}
}

var oneRow, _ = json.Marshal(map[string]any{"inputs": []map[string]any{{"name": "readings", "shape": []int{1, 4}, "datatype": "FP32", "data": []float32{231, 10, 50, 35}}}})

func (p *producer) run(ctx context.Context, workers int) {
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for ctx.Err() == nil && p.answered.Load() < p.target {
				p.attempted.Add(1)
				resp, err := p.hc.Post(p.url, "application/json", bytes.NewReader(oneRow))
				if err != nil {
					time.Sleep(20 * time.Millisecond) // the agent is down
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					p.answered.Add(1)
				} else {
					time.Sleep(20 * time.Millisecond) // starting up
				}
			}
		})
	}
	wg.Wait()
}

// agentGauge reads one unlabelled metric from the agent's /metrics.
func (f *fleet) agentGauge(id, name string) (float64, error) {
	resp, err := http.Get("http://" + f.listens[id] + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("%s not in /metrics of %s", name, id)
}

// waitDrained waits until the agent's spool stays empty.
func (f *fleet) waitDrained(id string, timeout time.Duration) {
	f.t.Helper()
	zeros := 0
	f.eventually(id+" spool drained", timeout, func() (bool, string) {
		d, err := f.agentGauge(id, "edgefleet_agent_spool_depth")
		if err != nil {
			zeros = 0
			return false, err.Error()
		}
		if d != 0 {
			zeros = 0
			return false, fmt.Sprintf("depth %v", d)
		}
		zeros++
		return zeros >= 5, "depth 0"
	})
}

// restartAgent starts agent id again on the same local address (the
// producer keeps calling it there).
func (f *fleet) restartAgent(id string, labels ...string) {
	f.t.Helper()
	listen := f.listens[id]
	args := []string{"--id", id, "--data", filepath.Join(f.dir, id), "--listen", listen, "--broker", f.broker, "--controller", f.api}
	for _, l := range labels {
		args = append(args, "--label", l)
	}
	args = append(args, f.trustFlags(id)...)
	p, err := proc.Start(id, filepath.Join(f.dir, id+".log"), filepath.Join(binDir, "fleet-agent"), args...)
	if err != nil {
		f.t.Fatal(err)
	}
	f.agents[id] = p
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.WaitHTTP(ctx, "http://"+listen+"/v2/health/ready"); err != nil {
		f.t.Fatal(err, "\n", f.logTail(id+".log"))
	}
}

// storedTelemetry is what the controller's store holds for one device.
type storedTelemetry struct {
	count, distinct, minSeq, maxSeq, epochs, inferences int64
}

func (f *fleet) storedTelemetry(id string) storedTelemetry {
	f.t.Helper()
	st, err := store.OpenReadOnly(context.Background(), filepath.Join(f.dir, "controller", store.FileName))
	if err != nil {
		f.t.Fatal(err)
	}
	defer st.Close()
	// Counted from the stored batches' seqs, not from the dedupe ranges:
	// a record stored twice shows as count > distinct.
	s, err := st.TelemetryStats(context.Background(), id)
	if err != nil {
		f.t.Fatalf("read the controller's telemetry of %s: %v", id, err)
	}
	return storedTelemetry{count: s.Records, distinct: s.Distinct, minSeq: int64(s.MinSeq), maxSeq: int64(s.MaxSeq), epochs: s.Epochs, inferences: s.Inferences}
}

// spoolStats stops nothing: the agent must be stopped before.
func (f *fleet) spoolStats(id string) spool.Stats {
	f.t.Helper()
	sp, err := spool.OpenSQLite(context.Background(), filepath.Join(f.dir, id, "spool.db"), 0)
	if err != nil {
		f.t.Fatal(err)
	}
	defer sp.Close()
	st, err := sp.Stats(context.Background())
	if err != nil {
		f.t.Fatal(err)
	}
	return st
}

// checkExactlyOnce stops the agent cleanly and checks that every record its
// spool committed is in the store exactly once.
func (f *fleet) checkExactlyOnce(id string) (spool.Stats, storedTelemetry) {
	f.t.Helper()
	f.waitDrained(id, 90*time.Second)
	if err := f.agents[id].Stop(10 * time.Second); err != nil {
		f.t.Fatal(err)
	}
	delete(f.agents, id)
	sp := f.spoolStats(id)
	got := f.storedTelemetry(id)
	left := f.leftAtStop(id, sp)
	if sp.Dropped != 0 {
		f.t.Fatalf("spool of %s after drain: %+v; want nothing dropped", id, sp)
	}
	sent := int64(sp.LastSeq) - left
	if got.count != sent || got.distinct != got.count || got.minSeq != 1 || got.maxSeq != sent || got.epochs != 1 {
		f.t.Fatalf("store holds %+v for %s; the spool committed seqs 1..%d of one epoch (the last %d at the stop): want 1..%d each exactly once", got, id, sp.LastSeq, left, sent)
	}
	return sp, got
}

// leftAtStop checks what a drained agent's spool holds after a clean stop:
// only the aggregates of the interval the stop closed early, which wait
// for the agent's next start. It returns how many.
func (f *fleet) leftAtStop(id string, sp spool.Stats) int64 {
	f.t.Helper()
	db, err := spool.OpenSQLite(context.Background(), filepath.Join(f.dir, id, "spool.db"), 0)
	if err != nil {
		f.t.Fatal(err)
	}
	defer db.Close()
	recs, err := db.Read(context.Background(), 0, sp.LastSeq, int(sp.Depth)+1)
	if err != nil {
		f.t.Fatal(err)
	}
	for i, r := range recs {
		if r.GetAggregate() == nil || r.GetSeq() != sp.LastSeq-uint64(len(recs)-1-i) {
			f.t.Fatalf("spool of %s after drain and stop holds %v; want only the aggregates spooled at the stop", id, recs)
		}
	}
	return int64(len(recs))
}

// checkExactlyOnce2 is checkExactlyOnce for a spool whose bound dropped
// records: every committed record not dropped is stored exactly once.
func (f *fleet) checkExactlyOnce2(id string) (spool.Stats, storedTelemetry) {
	f.t.Helper()
	f.waitDrained(id, 90*time.Second)
	if err := f.agents[id].Stop(10 * time.Second); err != nil {
		f.t.Fatal(err)
	}
	delete(f.agents, id)
	sp := f.spoolStats(id)
	got := f.storedTelemetry(id)
	left := f.leftAtStop(id, sp)
	if got.count != int64(sp.LastSeq-sp.Dropped)-left || got.distinct != got.count || got.maxSeq != int64(sp.LastSeq)-left || got.epochs != 1 {
		f.t.Fatalf("store holds %+v for %s; the spool committed seqs 1..%d (the last %d at the stop) and dropped %d: want the rest each exactly once", got, id, sp.LastSeq, left, sp.Dropped)
	}
	return sp, got
}

// startTelemetryFleet starts a controller (embedded broker unless external)
// and one agent running grid-anomaly 1.0.0, healthy.
func startTelemetryFleet(t *testing.T, external, id string) *fleet {
	f := startController(t, external)
	f.agentFlags = telemetryAgentConfig(t, f)
	f.startAgent(id, "suite=telemetry")
	f.pushExample("1.0.0")
	if _, err := f.client.Assign(context.Background(), client.Assignment{Model: "grid-anomaly", Version: "1.0.0", Selector: "suite=telemetry"}); err != nil {
		t.Fatal(err)
	}
	f.waitActive("1.0.0", id)
	for range 5 {
		f.infer(id, 1)
	}
	time.Sleep(2500 * time.Millisecond) // past the 1s health watch
	return f
}

func TestTelemetrySIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("kills an agent 20 times while it produces 50,000 records")
	}
	const (
		id     = "tel-kill-1"
		target = 50_000
		kills  = 20
	)
	f := startTelemetryFleet(t, "", id)
	p := newProducer(f.listens[id], target)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	done := make(chan struct{})
	go func() { p.run(ctx, 4); close(done) }()

	// Kill at 20 random points of the production.
	points := make([]int64, kills)
	for i := range points {
		points[i] = 1 + rand.Int64N(target-1)
	}
	slices.Sort(points)
	for i, at := range points {
		for p.answered.Load() < at && ctx.Err() == nil {
			time.Sleep(time.Duration(rand.IntN(3000)) * time.Microsecond)
		}
		f.agents[id].Kill()
		t.Logf("kill %d at %d answered", i+1, p.answered.Load())
		f.restartAgent(id, "suite=telemetry")
	}
	<-done
	if ctx.Err() != nil {
		t.Fatalf("production did not finish: %d of %d answered\n%s", p.answered.Load(), target, f.logs())
	}
	sp, got := f.checkExactlyOnce(id)
	answered, attempted := p.answered.Load(), p.attempted.Load()
	t.Logf("answered %d, attempted %d, committed %d (inference %d), lost from the queue %d over %d kills",
		answered, attempted, sp.LastSeq, got.inferences, max(answered+5-got.inferences, 0), kills)
	// 5 inferences before the kills.
	if got.inferences > attempted+5 {
		t.Fatalf("store has %d inference records, more than the %d requests made", got.inferences, attempted+5)
	}
	if lost := answered + 5 - got.inferences; lost > kills*(queueCapacity+queueBatch) {
		t.Fatalf("%d answered requests have no record; at most %d may be lost in %d kills", lost, kills*(queueCapacity+queueBatch), kills)
	}
}

// cutter is a TCP proxy in front of the broker that can cut the network:
// Cut closes every connection and refuses new ones until Restore.
type cutter struct {
	t      *testing.T
	ln     net.Listener
	to     string
	mu     sync.Mutex
	down   bool
	conns  map[net.Conn]bool
	closed chan struct{}
}

func startCutter(t *testing.T, to string) *cutter {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{t: t, ln: ln, to: strings.TrimPrefix(to, "tcp://"), conns: map[net.Conn]bool{}, closed: make(chan struct{})}
	go c.accept()
	t.Cleanup(func() { ln.Close(); <-c.closed; c.Cut() })
	return c
}

func (c *cutter) URL() string { return "tcp://" + c.ln.Addr().String() }

func (c *cutter) accept() {
	defer close(c.closed)
	for {
		in, err := c.ln.Accept()
		if err != nil {
			return
		}
		c.mu.Lock()
		down := c.down
		c.mu.Unlock()
		if down {
			in.Close()
			continue
		}
		out, err := net.Dial("tcp", c.to)
		if err != nil {
			in.Close()
			continue
		}
		c.mu.Lock()
		c.conns[in], c.conns[out] = true, true
		c.mu.Unlock()
		go func() { _, _ = io.Copy(out, in); out.Close() }()
		go func() { _, _ = io.Copy(in, out); in.Close() }()
	}
}

// Cut drops every connection, as a pulled cable would, and refuses new ones.
func (c *cutter) Cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = true
	for k := range c.conns {
		k.Close()
	}
	clear(c.conns)
}

// Restore lets connections through again.
func (c *cutter) Restore() {
	c.mu.Lock()
	c.down = false
	c.mu.Unlock()
}

func TestTelemetryBrokerRestartAndNetworkCut(t *testing.T) {
	if testing.Short() {
		t.Skip("restarts the controller's broker and cuts the agent's network while it sends")
	}
	const (
		id     = "tel-cut-1"
		target = 15_000
	)
	f := startController(t, "")
	cut := startCutter(t, f.broker)
	cfg := telemetryAgentConfig(t, f)
	// The agent reaches the broker through the cutter (the last --broker wins).
	f.agentFlags = func(id string) []string { return append(cfg(id), "--broker", cut.URL()) }
	f.startAgent(id, "suite=telemetry")
	f.pushExample("1.0.0")
	if _, err := f.client.Assign(context.Background(), client.Assignment{Model: "grid-anomaly", Version: "1.0.0", Selector: "suite=telemetry"}); err != nil {
		t.Fatal(err)
	}
	f.waitActive("1.0.0", id)
	for range 5 {
		f.infer(id, 1)
	}
	time.Sleep(2500 * time.Millisecond)

	p := newProducer(f.listens[id], target)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	done := make(chan struct{})
	go func() { p.run(ctx, 4); close(done) }()
	waitAnswered := func(n int64) {
		for p.answered.Load() < n && ctx.Err() == nil {
			time.Sleep(time.Millisecond)
		}
	}
	waitAnswered(target / 4)
	f.restartController() // SIGKILL: the embedded broker and ingest die mid-stream
	t.Logf("controller restarted at %d answered", p.answered.Load())
	waitAnswered(target / 2)
	cut.Cut()
	t.Logf("network cut at %d answered", p.answered.Load())
	waitAnswered(3 * target / 4)
	time.Sleep(2 * time.Second)
	cut.Restore()
	<-done
	if ctx.Err() != nil {
		t.Fatalf("production did not finish: %d of %d answered", p.answered.Load(), target)
	}
	sp, got := f.checkExactlyOnce(id)
	// Nothing was killed on the device: every answered request is stored.
	if want := p.answered.Load() + 5; got.inferences != want {
		t.Fatalf("store has %d inference records of %s; %d requests were answered: want each exactly once (spool %+v)", got.inferences, id, want, sp)
	}
	t.Logf("answered %d, stored %d records (%d inference) exactly once", p.answered.Load(), got.count, got.inferences)
}

// mosquittoAt runs Mosquitto (as shipped: default settings, no
// persistence) on addr until the test ends or the returned process is
// killed; restart it by calling again with the same addr.
func mosquittoAt(t *testing.T, dir, addr string) *proc.Process {
	t.Helper()
	bin := mosquittoBinary()
	if bin == "" {
		t.Skip("mosquitto is not installed: the Mosquitto restart test did NOT run (apt-get install -y mosquitto)")
	}
	host, portStr, _ := net.SplitHostPort(addr)
	conf := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("listener %s %s\nallow_anonymous true\npersistence false\n", portStr, host)), 0o644); err != nil {
		t.Fatal(err)
	}
	var m *proc.Process
	var err error
	for i := 0; ; i++ { // a killed broker's port can take a moment to free
		if err = proc.CheckFree(addr); err == nil || i == 50 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	if m, err = proc.Start("mosquitto", filepath.Join(dir, "mosquitto.log"), bin, "-c", conf); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return m
		}
		if time.Now().After(deadline) {
			t.Fatal("mosquitto did not listen within 10s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestTelemetryMosquittoRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("restarts Mosquitto while an agent sends")
	}
	const (
		id     = "tel-mq-1"
		target = 10_000
	)
	mqDir := t.TempDir()
	addr := fmt.Sprintf("127.0.0.1:%d", port(t))
	mq := mosquittoAt(t, mqDir, addr)
	f := startTelemetryFleet(t, "tcp://"+addr, id)

	p := newProducer(f.listens[id], target)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	done := make(chan struct{})
	go func() { p.run(ctx, 4); close(done) }()
	for _, at := range []int64{target / 3, 2 * target / 3} {
		for p.answered.Load() < at && ctx.Err() == nil {
			time.Sleep(time.Millisecond)
		}
		mq.Kill() // queued QoS 1 messages and sessions die with it
		t.Logf("mosquitto killed at %d answered", p.answered.Load())
		time.Sleep(500 * time.Millisecond)
		mq = mosquittoAt(t, mqDir, addr)
	}
	<-done
	if ctx.Err() != nil {
		t.Fatalf("production did not finish: %d of %d answered", p.answered.Load(), target)
	}
	_, got := f.checkExactlyOnce(id)
	if want := p.answered.Load() + 5; got.inferences != want {
		t.Fatalf("store has %d inference records of %s; %d requests were answered: want each exactly once", got.inferences, id, want)
	}
	t.Logf("answered %d, stored %d records exactly once across 2 Mosquitto restarts", p.answered.Load(), got.count)
}

// reportedState decodes the ReportedState the controller stored for id.
func (f *fleet) reportedState(id string) (*pb.ReportedState, error) {
	db, err := sql.Open("sqlite", "file:"+filepath.Join(f.dir, "controller", store.FileName)+"?mode=ro&_pragma=busy_timeout(5000)")
	if err != nil {
		return nil, err
	}
	defer db.Close()
	var blob []byte
	if err := db.QueryRow(`SELECT reported FROM devices WHERE id = ?`, id).Scan(&blob); err != nil {
		return nil, err
	}
	st := &pb.ReportedState{}
	if err := proto.Unmarshal(blob, st); err != nil {
		return nil, err
	}
	return st, nil
}

func TestTelemetrySpoolBoundDropsReachController(t *testing.T) {
	if testing.Short() {
		t.Skip("fills a small spool while the agent is offline")
	}
	const (
		id      = "tel-full-1"
		bound   = 100
		offline = 400
	)
	f := startController(t, "")
	cut := startCutter(t, f.broker)
	cfg := telemetryAgentConfig(t, f)
	f.agentFlags = func(id string) []string {
		return append(cfg(id), "--broker", cut.URL(), "--spool-max-records", strconv.Itoa(bound))
	}
	f.startAgent(id, "suite=telemetry")
	f.pushExample("1.0.0")
	if _, err := f.client.Assign(context.Background(), client.Assignment{Model: "grid-anomaly", Version: "1.0.0", Selector: "suite=telemetry"}); err != nil {
		t.Fatal(err)
	}
	f.waitActive("1.0.0", id)
	f.infer(id, 1)
	time.Sleep(2500 * time.Millisecond) // the health watch ends while online
	f.waitDrained(id, 30*time.Second)
	before := f.storedTelemetry(id)

	// Offline, the spool fills past its bound: the agent keeps serving,
	// and drops the oldest inference records.
	cut.Cut()
	for range offline {
		f.infer(id, 1)
	}
	cut.Restore()
	var reported uint64
	f.eventually("spool_dropped reported to the controller", 60*time.Second, func() (bool, string) {
		st, err := f.reportedState(id)
		if err != nil {
			return false, err.Error()
		}
		reported = st.GetSpoolDropped()
		return reported >= offline-bound, fmt.Sprintf("spool_dropped %d, want >= %d", reported, offline-bound)
	})
	sp, got := f.checkExactlyOnce2(id)
	if reported != sp.Dropped {
		t.Fatalf("controller has spool_dropped %d; the spool dropped %d", reported, sp.Dropped)
	}
	if sp.DroppedInference != sp.Dropped || sp.Dropped < offline-bound {
		t.Fatalf("spool stats %+v: want at least %d dropped, all of them inference records", sp, offline-bound)
	}
	if kept := got.inferences - before.inferences; kept != int64(offline-sp.DroppedInference) {
		t.Fatalf("%d of the %d offline inference records reached the store; the spool dropped %d", kept, offline, sp.DroppedInference)
	}
}
