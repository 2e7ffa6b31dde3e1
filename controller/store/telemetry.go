package store

import (
	"cmp"
	"context"
	"database/sql"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/edgefleet/edgefleet/controller/telemetry/summary"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// How telemetry is stored, and why. One row per record held ingest to a
// few tens of thousands of records a second (a B-tree write per record and
// per index), far below what a broker delivers. So:
//
//   - telemetry_seqs holds, per (device, spool epoch), the seqs ever
//     stored as disjoint inclusive ranges. An agent sends in order, so a
//     spool epoch is one range or a handful. A batch reads the ranges
//     around its seqs, keeps only the records not covered, and merges
//     their seqs in, in the same transaction: a seq is covered iff its
//     record was stored, once.
//   - telemetry_batches holds the raw records, one row per batch: the
//     batch as it came (serialized TelemetryBatch, zstd-compressed when
//     the agent sent it so), with the seqs it stored as delta-encoded
//     ranges. Duplicates of a resent batch are not in its seqs, so
//     TelemetryStats can count every stored record from these rows alone
//     and check that no seq appears twice.
//   - telemetry_minutes holds inference aggregates per device, model
//     version and minute, merged on write: from the agent's own
//     InferenceAggregate records (source 1) and, for agents that send only
//     per-inference records, folded by the controller (source 0). Reads
//     take the agent's aggregate for a device-minute when there is one
//     (Authoritative), since it counts inferences whose per-record rows
//     the agent's spool may have dropped.

// Kinds of telemetry record.
const (
	RecordInference = "inference"
	RecordEvent     = "event"
	// RecordAggregate is an agent's InferenceAggregate.
	RecordAggregate = "aggregate"
	// RecordSample is a sampled raw input; it is kept in the batch row.
	RecordSample = "sample"
	// RecordOther is a record whose body this controller does not know
	// (a newer agent); it is stored for dedupe and acked, so the agent can
	// free its spool.
	RecordOther = "other"
)

// Sources of a minute aggregate.
const (
	// SourceRecords marks aggregates the controller folded from
	// per-inference records.
	SourceRecords = 0
	// SourceAgent marks aggregates the agent folded itself.
	SourceAgent = 1
)

// BodyEncoding says how a batch row's body is stored.
type BodyEncoding int

// Body encodings.
const (
	// BodyNone: no raw body kept, only the seqs.
	BodyNone BodyEncoding = 0
	// BodyProto: a serialized edgefleet.v1.TelemetryBatch.
	BodyProto BodyEncoding = 1
	// BodyZstd: the same, compressed with zstd (as the agent sent it).
	BodyZstd BodyEncoding = 2
	// BodyFramed: what a batch row keeps, the bodies of the batches it
	// stores, each as a varint encoding and length-prefixed bytes. They
	// may hold duplicates; the row's seqs say which records it stored.
	BodyFramed BodyEncoding = 3
)

// TelemetryRecord is one spooled record of a device.
type TelemetryRecord struct {
	Seq       uint64
	Kind      string
	Model     string
	Version   string
	At        time.Time
	LatencyUS uint32
	Error     string
	// Event is set for RecordEvent; it is also appended to the device's
	// events the first time the record is stored.
	Event *Event
	// Aggregate is set for RecordAggregate.
	Aggregate *pb.InferenceAggregate
}

// TelemetryBatch is one batch of one device's records.
type TelemetryBatch struct {
	DeviceID string
	Epoch    string
	// Seen is when the controller received it.
	Seen    time.Time
	Records []TelemetryRecord
	// Body is the batch as received, kept as the raw records, in Encoding.
	Body     []byte
	Encoding BodyEncoding
	// Inferences are per-inference records in compact form, besides
	// Records: what the controller's decoder reads them into, with no
	// strings or times of their own, so a batch of hundreds is one
	// allocation and folds without a map lookup per record. Each is stored
	// exactly as the same record in Records would be (deduped by seq,
	// folded into its minute). Names and Errors are what their indexes
	// point at.
	Inferences []InferenceRow
	Names      []ModelVersion
	Errors     []string
}

// InferenceRow is one per-inference record in compact form (see
// TelemetryBatch.Inferences).
type InferenceRow struct {
	Seq uint64
	// AtMS is when the inference ran, in Unix milliseconds; 0 or less is
	// unknown: the batch's Seen stands for it, as for TelemetryRecord.
	AtMS      int64
	LatencyUS uint32
	// Name indexes TelemetryBatch.Names.
	Name uint32
	// Error is 0 for a success, else 1 + an index of TelemetryBatch.Errors.
	Error uint32
}

// ModelVersion names a model version.
type ModelVersion struct{ Model, Version string }

// TelemetryResult says what storing one batch did.
type TelemetryResult struct {
	// Inserted counts records stored by this call; the others of the batch
	// were already stored (duplicates).
	Inserted int
	// Duplicates counts records that were already stored.
	Duplicates int
}

// StoreTelemetry stores a batch of one device's records in one transaction,
// ignoring records already stored under the same (device, epoch, seq). When
// it returns nil, every record of the batch is durably stored.
func (s *Store) StoreTelemetry(ctx context.Context, id, epoch string, seen time.Time, recs []TelemetryRecord) (TelemetryResult, error) {
	res, err := s.StoreTelemetryBatches(ctx, []TelemetryBatch{{DeviceID: id, Epoch: epoch, Seen: seen, Records: recs}})
	if err != nil {
		return TelemetryResult{}, err
	}
	return res[0], nil
}

// StoreTelemetryBatches stores many batches, of any devices, in one
// transaction: the group commit of telemetry ingest, one disk sync for
// all. Each batch is deduped against everything stored before it,
// earlier batches of the same call included. When it returns nil, every
// record of every batch is durably stored; on an error, none is.
func (s *Store) StoreTelemetryBatches(ctx context.Context, batches []TelemetryBatch) ([]TelemetryResult, error) {
	results := make([]TelemetryResult, len(batches))
	// One telemetry writer at a time in this process, so no transaction
	// reads the cache between a failed commit and the reset below.
	s.telCache.write.Lock()
	defer s.telCache.write.Unlock()
	err := s.tx(ctx, func(tx *sql.Tx) error {
		clear(results)
		// Row statements run without the caller's cancellation: with a
		// cancellable context the driver starts a watcher goroutine per
		// statement, which costs more than the statement. The transaction
		// still ends with ctx (BeginTx watches it).
		rctx := context.WithoutCancel(ctx)
		w, err := s.newTelemetryWriter(rctx, tx)
		if err != nil {
			return err
		}
		defer w.close()
		for i := range batches {
			if results[i], err = w.batch(rctx, &batches[i]); err != nil {
				return err
			}
		}
		if err := w.finish(rctx); err != nil {
			return err
		}
		// A commit that fails after this clears it below.
		w.remember()
		return nil
	})
	if err != nil {
		s.telCache.reset()
		return nil, err
	}
	return results, nil
}

// telemetryCache keeps, across transactions, the dedupe ranges and the
// minute aggregates the writer last stored, so a group commit need not read
// back what the previous one wrote: the rows of a busy device are
// rewritten by every group. It only ever holds what is committed (see
// StoreTelemetryBatches) and is dropped whenever that is in doubt.
type telemetryCache struct {
	// write is held by each telemetry write transaction.
	write   sync.Mutex
	mu      sync.Mutex
	ranges  map[[2]string][]span
	minutes map[minuteKey]*pb.InferenceAggregate
}

// maxCached bounds each map; past it the map starts over (the rows are in
// the store).
const maxCached = 50_000

func (c *telemetryCache) reset() {
	c.mu.Lock()
	c.ranges, c.minutes = nil, nil
	c.mu.Unlock()
}

func (c *telemetryCache) getRanges(k [2]string) ([]span, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	r, ok := c.ranges[k]
	return r, ok
}

func (c *telemetryCache) getMinute(k minuteKey) *pb.InferenceAggregate {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.minutes[k]
}

// remember puts what this transaction stored into the cache.
func (w *telemetryWriter) remember() {
	c := &w.s.telCache
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ranges == nil || len(c.ranges)+len(w.order) > maxCached {
		c.ranges = map[[2]string][]span{}
	}
	if c.minutes == nil || len(c.minutes)+len(w.stored) > maxCached {
		c.minutes = map[minuteKey]*pb.InferenceAggregate{}
	}
	for _, st := range w.order {
		c.ranges[[2]string{st.device, st.epoch}] = st.have
	}
	for k, a := range w.stored {
		c.minutes[k] = a
	}
}

// seqKey maps a seq to a signed integer of the same order (SQLite's
// integers are signed 64-bit).
func seqKey(seq uint64) int64 { return int64(seq ^ 1<<63) }

func keySeq(k int64) uint64 { return uint64(k) ^ 1<<63 }

type minuteKey struct {
	device, model, version string
	source                 int
	slot, rollout          string
	minute                 int64
}

type deviceCounts struct {
	seen               time.Time
	ensured            bool
	inferences, errors int64
}

func hasEvent(recs []TelemetryRecord) bool {
	for i := range recs {
		if recs[i].Kind == RecordEvent {
			return true
		}
	}
	return false
}

// telemetryStatements are prepared once per store (the multi-row ones
// once per shape) and bound to each transaction (database/sql reuses the
// connection's prepared statement), so a group commit parses no SQL.
type telemetryStatements struct {
	once                     sync.Once
	err                      error
	ranges, delRange, getAgg *sql.Stmt
	mu                       sync.Mutex
	multi                    map[multiKey]*sql.Stmt
}

func (s *Store) telemetryStatements(ctx context.Context) (*telemetryStatements, error) {
	t := &s.tel
	t.once.Do(func() {
		for _, p := range []struct {
			dst **sql.Stmt
			sql string
		}{
			{&t.ranges, `SELECT first, last FROM telemetry_seqs WHERE device_id = ? AND spool_epoch = ?`},
			{&t.delRange, `DELETE FROM telemetry_seqs WHERE device_id = ? AND spool_epoch = ? AND first = ?`},
			{&t.getAgg, `SELECT agg FROM telemetry_minutes WHERE device_id = ? AND model = ? AND version = ? AND source = ? AND slot = ? AND rollout_id = ? AND minute_ms = ?`},
		} {
			if *p.dst, t.err = s.db.PrepareContext(ctx, p.sql); t.err != nil {
				t.err = fmt.Errorf("prepare telemetry statements: %w", t.err)
				return
			}
		}
	})
	return t, t.err
}

// stream is what one transaction stores for one (device, spool epoch):
// the stored ranges as read before (orig) and as they are now (have), and
// the records new in this transaction. Batches of the same stream in one
// group become one batch row and one write of the ranges.
type stream struct {
	device, epoch string
	orig          map[uint64]uint64 // first -> last, as stored
	have          []span            // sorted, disjoint, not touching
	fresh         []span            // seqs stored by this transaction, unsorted
	freshN        int               // how many
	inferences    int64
	body          []byte // framed bodies of the group's batches
	haveBody      bool
}

// telemetryWriter stores the batches of one transaction.
type telemetryWriter struct {
	s       *Store
	tx      *sql.Tx
	st      map[*sql.Stmt]*sql.Stmt
	stmts   *telemetryStatements
	minutes map[minuteKey]*pb.InferenceAggregate
	devices map[string]*deviceCounts
	streams map[[2]string]*stream
	order   []*stream
	// stored are the minute aggregates as written, for the cache.
	stored map[minuteKey]*pb.InferenceAggregate
	now    int64
	// last caches the aggregate the previous inference record went to:
	// consecutive records nearly always share it.
	lastKey minuteKey
	lastAgg *pb.InferenceAggregate
}

func (s *Store) newTelemetryWriter(ctx context.Context, tx *sql.Tx) (*telemetryWriter, error) {
	stmts, err := s.telemetryStatements(ctx)
	if err != nil {
		return nil, err
	}
	return &telemetryWriter{s: s, tx: tx, stmts: stmts, st: map[*sql.Stmt]*sql.Stmt{},
		minutes: map[minuteKey]*pb.InferenceAggregate{}, devices: map[string]*deviceCounts{},
		streams: map[[2]string]*stream{}, stored: map[minuteKey]*pb.InferenceAggregate{}, now: s.now().UnixMilli()}, nil
}

// stmt binds a prepared statement to the transaction.
func (w *telemetryWriter) stmt(ctx context.Context, p *sql.Stmt) *sql.Stmt {
	if t, ok := w.st[p]; ok {
		return t
	}
	t := w.tx.StmtContext(ctx, p)
	w.st[p] = t
	return t
}

func (w *telemetryWriter) close() {
	for _, t := range w.st {
		t.Close()
	}
}

// span is an inclusive range of seqs.
type span struct{ first, last uint64 }

// spans sorts seqs, drops repeats and coalesces them into ranges.
func spans(seqs []uint64) []span {
	if len(seqs) == 0 {
		return nil
	}
	slices.Sort(seqs)
	seqs = slices.Compact(seqs)
	out := []span{{seqs[0], seqs[0]}}
	for _, v := range seqs[1:] {
		if last := &out[len(out)-1]; v == last.last+1 {
			last.last = v
		} else {
			out = append(out, span{v, v})
		}
	}
	return out
}

// covers reports whether seq is in one of the sorted spans.
func covers(have []span, seq uint64) bool {
	i, _ := slices.BinarySearchFunc(have, seq, func(r span, v uint64) int {
		switch {
		case r.last < v:
			return -1
		case r.first > v:
			return 1
		}
		return 0
	})
	return i < len(have) && have[i].first <= seq && seq <= have[i].last
}

// union merges sorted disjoint spans with new spans into sorted spans,
// coalescing those that touch.
func union(a, b []span) []span {
	all := append(slices.Clone(a), b...)
	slices.SortFunc(all, func(x, y span) int { return cmp.Compare(x.first, y.first) })
	var out []span
	for _, r := range all {
		if n := len(out); n > 0 && (out[n-1].last == ^uint64(0) || r.first <= out[n-1].last+1) {
			out[n-1].last = max(out[n-1].last, r.last)
			continue
		}
		out = append(out, r)
	}
	return out
}

func (w *telemetryWriter) stream(ctx context.Context, id, epoch string) (*stream, error) {
	k := [2]string{id, epoch}
	if st := w.streams[k]; st != nil {
		return st, nil
	}
	st := &stream{device: id, epoch: epoch, orig: map[uint64]uint64{}}
	if have, ok := w.s.telCache.getRanges(k); ok {
		for _, r := range have {
			st.orig[r.first] = r.last
		}
		st.have = have // never changed in place: union makes a new slice
		w.streams[k] = st
		w.order = append(w.order, st)
		return st, nil
	}
	rows, err := w.stmt(ctx, w.stmts.ranges).QueryContext(ctx, id, epoch)
	if err != nil {
		return nil, fmt.Errorf("device %s: read telemetry seqs: %w", id, err)
	}
	defer rows.Close()
	for rows.Next() {
		var f, l int64
		if err := rows.Scan(&f, &l); err != nil {
			return nil, fmt.Errorf("device %s: read telemetry seqs: %w", id, err)
		}
		st.orig[keySeq(f)] = keySeq(l)
		st.have = append(st.have, span{keySeq(f), keySeq(l)})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("device %s: read telemetry seqs: %w", id, err)
	}
	st.have = union(nil, st.have) // rows come in key order; this also checks it
	w.streams[k] = st
	w.order = append(w.order, st)
	return st, nil
}

func (w *telemetryWriter) batch(ctx context.Context, b *TelemetryBatch) (TelemetryResult, error) {
	var res TelemetryResult
	dc := w.devices[b.DeviceID]
	if dc == nil {
		dc = &deviceCounts{seen: b.Seen}
		w.devices[b.DeviceID] = dc
	}
	if !dc.ensured && hasEvent(b.Records) {
		// The row must exist before the device's events reference it;
		// otherwise finish creates or updates it in one statement.
		if err := w.s.ensureDevice(ctx, w.tx, b.DeviceID, b.Seen); err != nil {
			return res, err
		}
		dc.ensured = true
	}
	if b.Seen.After(dc.seen) {
		dc.seen = b.Seen
	}
	if len(b.Records) == 0 && len(b.Inferences) == 0 {
		return res, nil
	}
	st, err := w.stream(ctx, b.DeviceID, b.Epoch)
	if err != nil {
		return res, err
	}
	// Agents send seqs ascending; then a repeat inside the batch is
	// impossible and needs no set.
	d := dedupe{have: st.have, res: &res}
	if !distinctAscending(b) {
		d.taken = make(map[uint64]bool, len(b.Records)+len(b.Inferences))
	}
	for i := range b.Records {
		r := &b.Records[i]
		if !d.isNew(r.Seq) {
			continue
		}
		if err := w.record(ctx, b.DeviceID, r, dc); err != nil {
			return res, err
		}
		if r.Kind == RecordInference {
			st.inferences++
		}
	}
	if err := w.inferences(b, st, dc, &d); err != nil {
		return res, err
	}
	if res.Inserted == 0 {
		return res, nil
	}
	st.have = union(st.have, d.added)
	st.fresh = append(st.fresh, d.added...)
	st.freshN += res.Inserted
	if b.Encoding != BodyNone && b.Body != nil {
		st.body = protowire.AppendVarint(st.body, uint64(b.Encoding))
		st.body = protowire.AppendBytes(st.body, b.Body)
		st.haveBody = true
	}
	return res, nil
}

// dedupe tells a batch's new records from those already stored, and
// collects the new seqs as ranges (one, for a batch of consecutive seqs).
type dedupe struct {
	have []span // stored before the batch
	// taken holds the batch's seqs seen so far, when they may repeat.
	taken map[uint64]bool
	added []span
	res   *TelemetryResult
}

// isNew reports whether seq is not stored yet, and if so takes it.
func (d *dedupe) isNew(seq uint64) bool {
	if covers(d.have, seq) || (d.taken != nil && d.taken[seq]) {
		d.res.Duplicates++
		return false
	}
	if d.taken != nil {
		d.taken[seq] = true
	}
	d.take(seq)
	return true
}

// take counts seq as stored by the batch.
func (d *dedupe) take(seq uint64) {
	if n := len(d.added); n > 0 && d.added[n-1].last != ^uint64(0) && d.added[n-1].last+1 == seq {
		d.added[n-1].last = seq
	} else {
		d.added = append(d.added, span{seq, seq})
	}
	d.res.Inserted++
}

// distinctAscending reports whether b's seqs ascend strictly in Records and
// in Inferences, with none in both: then no seq repeats inside b.
func distinctAscending(b *TelemetryBatch) bool {
	for i := 1; i < len(b.Records); i++ {
		if b.Records[i].Seq <= b.Records[i-1].Seq {
			return false
		}
	}
	for i := 1; i < len(b.Inferences); i++ {
		if b.Inferences[i].Seq <= b.Inferences[i-1].Seq {
			return false
		}
	}
	for i, j := 0, 0; i < len(b.Records) && j < len(b.Inferences); {
		switch a, c := b.Records[i].Seq, b.Inferences[j].Seq; {
		case a == c:
			return false
		case a < c:
			i++
		default:
			j++
		}
	}
	return true
}

// overlaps reports whether any of the sorted spans meets [lo, hi].
func overlaps(have []span, lo, hi uint64) bool {
	i, _ := slices.BinarySearchFunc(have, lo, func(r span, v uint64) int { return cmp.Compare(r.last, v) })
	return i < len(have) && have[i].first <= hi
}

// inferences stores b.Inferences: each new one is folded into its minute
// aggregate and the device's counters, as record does for a
// RecordInference. When no seq of b repeats (d.taken is nil) and b's seq
// span meets nothing stored, all are new, and need no lookup each.
func (w *telemetryWriter) inferences(b *TelemetryBatch, st *stream, dc *deviceCounts, d *dedupe) error {
	rows := b.Inferences
	if len(rows) == 0 {
		return nil
	}
	fresh := d.taken == nil && !overlaps(d.have, rows[0].Seq, rows[len(rows)-1].Seq)
	// timeout caches summary.IsTimeout per error text: 0 unknown, 1 no, 2 yes.
	timeout := make([]int8, len(b.Errors))
	seen := b.Seen.UnixMilli()
	var agg *pb.InferenceAggregate
	lastName, lastMinute := uint32(0), int64(0)
	for i := range rows {
		r := &rows[i]
		if int(r.Name) >= len(b.Names) || int(r.Error) > len(b.Errors) {
			return fmt.Errorf("telemetry of %s, seq %d: inference row names model %d of %d and error %d of %d", b.DeviceID, r.Seq, r.Name, len(b.Names), r.Error, len(b.Errors))
		}
		if fresh {
			d.take(r.Seq)
		} else if !d.isNew(r.Seq) {
			continue
		}
		at := r.AtMS
		if at <= 0 {
			at = seen
		}
		minute := at - ((at%60_000)+60_000)%60_000
		if agg == nil || r.Name != lastName || minute != lastMinute {
			n := b.Names[r.Name]
			key := minuteKey{device: b.DeviceID, model: n.Model, version: n.Version, source: SourceRecords, minute: minute}
			if agg = w.minutes[key]; agg == nil {
				agg = &pb.InferenceAggregate{Model: n.Model, Version: n.Version, StartUnixMs: minute, IntervalMs: 60_000, LatencyUs: summary.NewLatency()}
				w.minutes[key] = agg
			}
			lastName, lastMinute = r.Name, minute
		}
		agg.Count++
		dc.inferences++
		st.inferences++
		if r.Error != 0 {
			agg.Errors++
			dc.errors++
			e := r.Error - 1
			if timeout[e] == 0 {
				timeout[e] = 1
				if summary.IsTimeout(b.Errors[e]) {
					timeout[e] = 2
				}
			}
			if timeout[e] == 2 {
				agg.Timeouts++
			}
		} else if int(r.LatencyUS) < len(shortLatency) {
			agg.LatencyUs.Counts[shortLatency[r.LatencyUS]]++
		} else {
			summary.Observe(agg.LatencyUs, float64(r.LatencyUS), 1)
		}
	}
	return nil
}

// shortLatency is summary.Bucket on summary.LatencyBounds of each latency
// under 16 ms, in µs: most inferences, found without a binary search.
var shortLatency = func() []uint8 {
	t := make([]uint8, 16_384)
	for v := range t {
		t[v] = uint8(summary.Bucket(summary.LatencyBounds, float64(v)))
	}
	return t
}()

// record accounts for one newly stored record.
func (w *telemetryWriter) record(ctx context.Context, id string, r *TelemetryRecord, dc *deviceCounts) error {
	switch r.Kind {
	case RecordInference:
		minute := minuteOf(r.At)
		agg := w.lastAgg
		if k := &w.lastKey; agg == nil || k.minute != minute || k.source != SourceRecords || k.device != id || k.model != r.Model || k.version != r.Version {
			key := minuteKey{device: id, model: r.Model, version: r.Version, source: SourceRecords, minute: minute}
			agg = w.minutes[key]
			if agg == nil {
				agg = &pb.InferenceAggregate{Model: r.Model, Version: r.Version, StartUnixMs: minute, IntervalMs: 60_000, LatencyUs: summary.NewLatency()}
				w.minutes[key] = agg
			}
			w.lastKey, w.lastAgg = key, agg
		}
		agg.Count++
		dc.inferences++
		if r.Error != "" {
			agg.Errors++
			dc.errors++
			if summary.IsTimeout(r.Error) {
				agg.Timeouts++
			}
		} else {
			// Latency of successful inferences only: a failure's time says
			// how fast it failed, not how fast the model is.
			summary.Observe(agg.LatencyUs, float64(r.LatencyUS), 1)
		}
	case RecordAggregate:
		a := r.Aggregate
		if a == nil {
			return nil
		}
		k := minuteKey{device: id, model: a.GetModel(), version: a.GetVersion(), source: SourceAgent, slot: a.GetSlot(), rollout: a.GetRolloutId(), minute: minuteOf(time.UnixMilli(a.GetStartUnixMs()))}
		agg := w.minutes[k]
		if agg == nil {
			agg = &pb.InferenceAggregate{Slot: a.GetSlot(), Model: a.GetModel(), Version: a.GetVersion(), RolloutId: a.GetRolloutId(), StartUnixMs: k.minute, IntervalMs: 60_000}
			w.minutes[k] = agg
		}
		// Ingest checks aggregates (summary.CheckAggregate) before they
		// get here; a histogram that still does not merge is left out and
		// the counts kept, rather than failing, and so stalling, the
		// whole group of batches.
		_ = summary.MergeAggregate(agg, a)
	case RecordEvent:
		if r.Event != nil {
			e := *r.Event
			e.DeviceID = id
			if err := insertEvent(ctx, w.tx, e); err != nil {
				return err
			}
		}
	}
	return nil
}

func minuteOf(t time.Time) int64 {
	m := t.UnixMilli()
	return m - ((m%60_000)+60_000)%60_000
}

// finish writes each stream's ranges and batch row, the minute
// aggregates and the devices' counters. Each table gets multi-row
// statements (rows of many devices in one statement): a group commit
// touches a row or two per device, and executing a statement costs more
// than the row it writes.
func (w *telemetryWriter) finish(ctx context.Context) error {
	var ranges, batches [][]any
	for _, st := range w.order {
		if st.freshN == 0 {
			continue
		}
		rows, err := w.rangeRows(ctx, st)
		if err != nil {
			return err
		}
		ranges = append(ranges, rows...)
		added := union(nil, st.fresh)
		var body any
		enc := BodyNone
		if st.haveBody {
			body, enc = st.body, BodyFramed
		}
		batches = append(batches, []any{st.device, st.epoch, seqKey(added[0].first), seqKey(added[len(added)-1].last),
			st.freshN, st.inferences, encodeSpans(added), int(enc), body, w.now})
	}
	if err := w.multi(ctx, `INSERT OR REPLACE INTO telemetry_seqs (device_id, spool_epoch, first, last) VALUES `, "", ranges); err != nil {
		return fmt.Errorf("store telemetry seqs: %w", err)
	}
	if err := w.multi(ctx, `INSERT INTO telemetry_batches (device_id, spool_epoch, first_seq, last_seq, records, inferences, seqs, encoding, body, received_ms) VALUES `, "", batches); err != nil {
		return fmt.Errorf("store telemetry batches: %w", err)
	}
	devices := make([][]any, 0, len(w.devices))
	for id, dc := range w.devices {
		devices = append(devices, []any{id, w.now, ms(dc.seen), dc.inferences, dc.errors})
	}
	// ensureDevice and the inference counters in one statement.
	if err := w.multi(ctx, `INSERT INTO devices (id, created_ms, last_seen_ms, inferences, inference_errors) VALUES `,
		` ON CONFLICT (id) DO UPDATE SET last_seen_ms = MAX(last_seen_ms, excluded.last_seen_ms),
			inferences = inferences + excluded.inferences, inference_errors = inference_errors + excluded.inference_errors`, devices); err != nil {
		return fmt.Errorf("count inferences: %w", err)
	}
	getAgg := w.stmt(ctx, w.stmts.getAgg)
	minutes := make([][]any, 0, len(w.minutes))
	for k, agg := range w.minutes {
		if prev := w.s.telCache.getMinute(k); prev != nil {
			// The cached object is what the store holds; merged in place
			// all the same (no copy of a histogram per device and
			// commit): if this transaction fails, StoreTelemetryBatches
			// drops the whole cache, and only telemetry writers, one at a
			// time, touch it.
			_ = summary.MergeAggregate(prev, agg) // as in record
			agg = prev
		} else {
			var old []byte
			err := getAgg.QueryRowContext(ctx, k.device, k.model, k.version, k.source, k.slot, k.rollout, k.minute).Scan(&old)
			switch {
			case err == sql.ErrNoRows:
			case err != nil:
				return fmt.Errorf("device %s: read minute aggregate: %w", k.device, err)
			default:
				prev, err := unmarshalAggregate(old)
				if err != nil {
					return fmt.Errorf("device %s: minute aggregate of %s@%s at %d is corrupt: %w", k.device, k.model, k.version, k.minute, err)
				}
				_ = summary.MergeAggregate(prev, agg) // as in record
				agg = prev
			}
		}
		w.stored[k] = agg
		blob, err := marshalAggregate(agg)
		if err != nil {
			return err
		}
		minutes = append(minutes, []any{k.device, k.model, k.version, k.source, k.slot, k.rollout, k.minute, int64(agg.Count), int64(agg.Errors), blob})
	}
	if err := w.multi(ctx, `INSERT OR REPLACE INTO telemetry_minutes (device_id, model, version, source, slot, rollout_id, minute_ms, count, errors, agg) VALUES `, "", minutes); err != nil {
		return fmt.Errorf("store minute aggregates: %w", err)
	}
	return nil
}

// multiRows is how many rows one multi-row statement writes at most.
const multiRows = 64

// multi writes rows with statements "head (?, ...), (?, ...) tail", up to
// multiRows rows each, prepared once per shape and kept by the store.
func (w *telemetryWriter) multi(ctx context.Context, head, tail string, rows [][]any) error {
	for len(rows) > 0 {
		n := min(len(rows), multiRows)
		st, err := w.s.tel.multiStmt(ctx, w.s.db, head, tail, len(rows[0]), n)
		if err != nil {
			return err
		}
		args := make([]any, 0, n*len(rows[0]))
		for _, r := range rows[:n] {
			args = append(args, r...)
		}
		if _, err := w.stmt(ctx, st).ExecContext(ctx, args...); err != nil {
			return err
		}
		rows = rows[n:]
	}
	return nil
}

type multiKey struct {
	head, tail string
	cols, rows int
}

// multiStmt returns the prepared statement for rows rows of cols columns.
func (t *telemetryStatements) multiStmt(ctx context.Context, db *sql.DB, head, tail string, cols, rows int) (*sql.Stmt, error) {
	k := multiKey{head, tail, cols, rows}
	t.mu.Lock()
	defer t.mu.Unlock()
	if st, ok := t.multi[k]; ok {
		return st, nil
	}
	one := "(" + strings.TrimSuffix(strings.Repeat("?, ", cols), ", ") + ")"
	st, err := db.PrepareContext(ctx, head+strings.TrimSuffix(strings.Repeat(one+", ", rows), ", ")+tail)
	if err != nil {
		return nil, err
	}
	if t.multi == nil {
		t.multi = map[multiKey]*sql.Stmt{}
	}
	t.multi[k] = st
	return st, nil
}

// rangeRows returns the rows that make a stream's stored ranges what they
// are now (for INSERT OR REPLACE: a range whose end moved is replaced in
// place), and deletes those merged away, which only happens when a gap
// fills.
func (w *telemetryWriter) rangeRows(ctx context.Context, st *stream) ([][]any, error) {
	var rows [][]any
	keep := map[uint64]bool{}
	for _, r := range st.have {
		if last, ok := st.orig[r.first]; !ok || last != r.last {
			rows = append(rows, []any{st.device, st.epoch, seqKey(r.first), seqKey(r.last)})
		}
		keep[r.first] = true
	}
	for first := range st.orig {
		if !keep[first] {
			if _, err := w.stmt(ctx, w.stmts.delRange).ExecContext(ctx, st.device, st.epoch, seqKey(first)); err != nil {
				return nil, fmt.Errorf("device %s: store telemetry seqs: %w", st.device, err)
			}
		}
	}
	return rows, nil
}

// encodeSpans writes ranges as varints: first, then for each range the
// gap from the previous range's end and its length, so a batch of
// consecutive seqs costs a few bytes.
func encodeSpans(rs []span) []byte {
	var b []byte
	prev := uint64(0)
	for i, r := range rs {
		if i == 0 {
			b = protowire.AppendVarint(b, r.first)
		} else {
			b = protowire.AppendVarint(b, r.first-prev)
		}
		b = protowire.AppendVarint(b, r.last-r.first)
		prev = r.last
	}
	return b
}

func decodeSpans(b []byte) ([]span, error) {
	var out []span
	prev := uint64(0)
	for len(b) > 0 {
		v, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return nil, fmt.Errorf("seq ranges: %w", protowire.ParseError(n))
		}
		b = b[n:]
		l, n := protowire.ConsumeVarint(b)
		if n < 0 {
			return nil, fmt.Errorf("seq ranges: %w", protowire.ParseError(n))
		}
		b = b[n:]
		first := v
		if len(out) > 0 {
			first = prev + v
		}
		out = append(out, span{first, first + l})
		prev = first + l
	}
	return out, nil
}

// TelemetryCount returns how many telemetry records of a device are stored.
func (s *Store) TelemetryCount(ctx context.Context, id string) (int64, error) {
	var n int64
	err := s.db.QueryRowContext(ctx, `SELECT IFNULL(SUM(records), 0) FROM telemetry_batches WHERE device_id = ?`, id).Scan(&n)
	return n, err
}

// TelemetryStats sums up the raw records stored for one device, counted
// from the batch rows alone (not from the dedupe ranges), so a record
// stored twice shows as Records > Distinct.
type TelemetryStats struct {
	Records, Distinct, Inferences int64
	MinSeq, MaxSeq                uint64
	Epochs                        int64
}

// TelemetryStats reads the stored records of device id.
func (s *Store) TelemetryStats(ctx context.Context, id string) (TelemetryStats, error) {
	var st TelemetryStats
	rows, err := s.db.QueryContext(ctx, `SELECT spool_epoch, records, inferences, seqs FROM telemetry_batches WHERE device_id = ?`, id)
	if err != nil {
		return st, fmt.Errorf("read telemetry of %s: %w", id, err)
	}
	defer rows.Close()
	type es struct {
		epoch string
		seq   uint64
	}
	seen := map[es]bool{}
	epochs := map[string]bool{}
	first := true
	for rows.Next() {
		var epoch string
		var recs, infs int64
		var blob []byte
		if err := rows.Scan(&epoch, &recs, &infs, &blob); err != nil {
			return st, fmt.Errorf("read telemetry of %s: %w", id, err)
		}
		rs, err := decodeSpans(blob)
		if err != nil {
			return st, fmt.Errorf("read telemetry of %s: %w", id, err)
		}
		epochs[epoch] = true
		st.Inferences += infs
		var n int64
		for _, r := range rs {
			for v := r.first; ; v++ {
				n++
				seen[es{epoch, v}] = true
				if first || v < st.MinSeq {
					st.MinSeq = v
				}
				if first || v > st.MaxSeq {
					st.MaxSeq = v
				}
				first = false
				if v == r.last {
					break
				}
			}
		}
		if n != recs {
			return st, fmt.Errorf("telemetry of %s: a batch row says %d records but its seqs are %d", id, recs, n)
		}
		st.Records += n
	}
	st.Distinct, st.Epochs = int64(len(seen)), int64(len(epochs))
	return st, rows.Err()
}

// Minute is one stored inference aggregate of a device, model version and
// minute.
type Minute struct {
	DeviceID  string
	Model     string
	Version   string
	Source    int
	Slot      string
	RolloutID string
	Start     time.Time
	Aggregate *pb.InferenceAggregate
}

// MinuteQuery selects minute aggregates. Empty fields select all.
type MinuteQuery struct {
	Model, Version string
	// DeviceIDs, when not nil, keeps only these devices.
	DeviceIDs []string
	// Since and Until bound the minutes' starts: minutes that overlap
	// [Since, Until]. Zero values leave that side open.
	Since, Until time.Time
	// Limit caps the rows read, newest first (0: no cap).
	Limit int
}

// Minutes returns the minute aggregates q selects, newest first, of every
// source (see Authoritative).
func (s *Store) Minutes(ctx context.Context, q MinuteQuery) ([]Minute, error) {
	var where []string
	var args []any
	if q.Model != "" {
		where, args = append(where, "model = ?"), append(args, q.Model)
	}
	if q.Version != "" {
		where, args = append(where, "version = ?"), append(args, q.Version)
	}
	if !q.Since.IsZero() {
		where, args = append(where, "minute_ms >= ?"), append(args, minuteOf(q.Since))
	}
	if !q.Until.IsZero() {
		where, args = append(where, "minute_ms <= ?"), append(args, q.Until.UnixMilli())
	}
	if q.DeviceIDs != nil {
		if len(q.DeviceIDs) == 0 {
			return nil, nil
		}
		where = append(where, "device_id IN (SELECT value FROM json_each(?))")
		args = append(args, jsonList(q.DeviceIDs))
	}
	sqlq := `SELECT device_id, model, version, source, slot, rollout_id, minute_ms, agg FROM telemetry_minutes`
	if len(where) > 0 {
		sqlq += " WHERE " + strings.Join(where, " AND ")
	}
	sqlq += " ORDER BY minute_ms DESC"
	if q.Limit > 0 {
		sqlq += fmt.Sprintf(" LIMIT %d", q.Limit)
	}
	rows, err := s.db.QueryContext(ctx, sqlq, args...)
	if err != nil {
		return nil, fmt.Errorf("read minute aggregates: %w", err)
	}
	defer rows.Close()
	var out []Minute
	for rows.Next() {
		var m Minute
		var at int64
		var blob []byte
		if err := rows.Scan(&m.DeviceID, &m.Model, &m.Version, &m.Source, &m.Slot, &m.RolloutID, &at, &blob); err != nil {
			return nil, fmt.Errorf("read minute aggregates: %w", err)
		}
		m.Start = fromMS(at)
		if m.Aggregate, err = unmarshalAggregate(blob); err != nil {
			return nil, fmt.Errorf("minute aggregate of %s at %s is corrupt: %w", m.DeviceID, m.Start, err)
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

func jsonList(ss []string) string {
	var b strings.Builder
	b.WriteByte('[')
	for i, s := range ss {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, "%q", s)
	}
	b.WriteByte(']')
	return b.String()
}

// Authoritative keeps, for each device, model version and minute, the
// agent's own aggregates when there are any, else the ones folded from
// per-inference records, so no inference is counted twice. Order is kept.
func Authoritative(ms []Minute) []Minute {
	type k struct {
		dev, model, version string
		at                  int64
	}
	agent := map[k]bool{}
	for _, m := range ms {
		if m.Source == SourceAgent {
			agent[k{m.DeviceID, m.Model, m.Version, m.Start.UnixMilli()}] = true
		}
	}
	out := ms[:0:0]
	for _, m := range ms {
		if m.Source == SourceRecords && agent[k{m.DeviceID, m.Model, m.Version, m.Start.UnixMilli()}] {
			continue
		}
		out = append(out, m)
	}
	return out
}

// InferenceSample is one inference outcome, as gates read it.
type InferenceSample struct {
	DeviceID  string
	LatencyUS uint32
	Error     string
}

// InferenceSamples returns the inference outcomes of model@version in the
// minutes overlapping [since, until], newest minute first, at most limit.
// They are rebuilt from the minute aggregates: errors as "error" or
// "timed out", latencies as the middle of their histogram bucket (within
// 5 % of the true value on summary.LatencyBounds).
func (s *Store) InferenceSamples(ctx context.Context, model, version string, since, until time.Time, limit int) ([]InferenceSample, error) {
	ms, err := s.Minutes(ctx, MinuteQuery{Model: model, Version: version, Since: since, Until: until})
	if err != nil {
		return nil, fmt.Errorf("read inferences of %s@%s: %w", model, version, err)
	}
	var out []InferenceSample
	add := func(x InferenceSample, n uint64) bool {
		for range n {
			if len(out) >= limit {
				return false
			}
			out = append(out, x)
		}
		return true
	}
	for _, m := range Authoritative(ms) {
		a := m.Aggregate
		timeouts := min(a.GetTimeouts(), a.GetErrors())
		if !add(InferenceSample{DeviceID: m.DeviceID, Error: "timed out"}, timeouts) ||
			!add(InferenceSample{DeviceID: m.DeviceID, Error: "error"}, a.GetErrors()-timeouts) {
			break
		}
		h := a.GetLatencyUs()
		for i, c := range h.GetCounts() {
			if c == 0 {
				continue
			}
			v := summary.Midpoint(h.Bounds, i)
			if !add(InferenceSample{DeviceID: m.DeviceID, LatencyUS: uint32(min(v, 1<<32-1))}, c) {
				break
			}
		}
		if len(out) >= limit {
			break
		}
	}
	return out, nil
}

// PruneTelemetry deletes raw batch rows received before rawBefore and
// minute aggregates of minutes before aggBefore, and returns how many rows
// it deleted. At most limit batch rows go per call (they are the bulk), so
// a large backlog never holds the write lock for long: call it again
// while it returns limit. The dedupe ranges stay: they are
// small, and forgetting them would let a very late resend be stored again.
func (s *Store) PruneTelemetry(ctx context.Context, rawBefore, aggBefore time.Time, limit int) (batches, minutes int64, err error) {
	s.telCache.write.Lock()
	defer s.telCache.write.Unlock()
	err = s.tx(ctx, func(tx *sql.Tx) error {
		r, err := tx.ExecContext(ctx, `DELETE FROM telemetry_batches WHERE id IN (SELECT id FROM telemetry_batches WHERE received_ms < ? LIMIT ?)`, rawBefore.UnixMilli(), limit)
		if err != nil {
			return fmt.Errorf("prune telemetry batches: %w", err)
		}
		batches, _ = r.RowsAffected()
		r, err = tx.ExecContext(ctx, `DELETE FROM telemetry_minutes WHERE minute_ms < ?`, aggBefore.UnixMilli())
		if err != nil {
			return fmt.Errorf("prune minute aggregates: %w", err)
		}
		minutes, _ = r.RowsAffected()
		if minutes > 0 {
			s.telCache.reset()
		}
		return nil
	})
	return batches, minutes, err
}

// marshalAggregate serializes a minute aggregate for its row. A latency
// histogram on summary.LatencyBounds is stored without its bounds (they
// are most of its bytes, and the row is rewritten by every group commit
// that adds to its minute); unmarshalAggregate puts them back.
func marshalAggregate(a *pb.InferenceAggregate) ([]byte, error) {
	h := a.GetLatencyUs()
	if h == nil || !slices.Equal(h.Bounds, summary.LatencyBounds) {
		return proto.Marshal(a)
	}
	bounds := h.Bounds
	h.Bounds = nil
	defer func() { h.Bounds = bounds }()
	return proto.Marshal(a)
}

func unmarshalAggregate(b []byte) (*pb.InferenceAggregate, error) {
	a := new(pb.InferenceAggregate)
	if err := proto.Unmarshal(b, a); err != nil {
		return nil, err
	}
	if h := a.GetLatencyUs(); h != nil && len(h.Bounds) == 0 && len(h.Counts) == len(summary.LatencyBounds)+1 {
		h.Bounds = summary.LatencyBounds
	}
	return a, nil
}

// OpenReadOnly opens the database at path for reading only, without
// migrating it: for tools and tests that inspect a running controller's
// store (TelemetryStats) beside it.
func OpenReadOnly(ctx context.Context, path string) (*Store, error) {
	q := url.Values{}
	q.Set("mode", "ro")
	q.Add("_pragma", "busy_timeout(5000)")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open database %s read-only: %w", path, err)
	}
	return &Store{db: db, now: time.Now}, nil
}
