package spool

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"sync"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// schemaVersion is the layout of spool.db. Open refuses a file with a newer
// layout rather than guess at it.
const schemaVersion = 1

// maxRecordBody caps one stored record; records are small (an inference
// outcome or an event), so anything bigger is corruption.
const maxRecordBody = 64 << 10

// SQLite is the durable spool, one SQLite file in WAL mode.
//
// It runs with synchronous=NORMAL, not FULL. In WAL mode NORMAL never
// corrupts the file and loses nothing when the agent process crashes; a
// power cut can lose the last transactions before the next checkpoint. For
// telemetry that is the right trade: FULL would fsync on every commit, which
// on an SD card costs milliseconds per batch and wears the card, to save a
// few hundred milliseconds of inference records. A lost delete (an ack) only
// makes the agent send a record again, which the controller dedupes.
//
// All methods are safe for concurrent use. Database access goes through one
// connection, so the in-memory record count stays exact.
type SQLite struct {
	path     string
	max      uint64
	maxBytes uint64
	epoch    string

	mu      sync.Mutex // guards db use, depth and dropped
	db      *sql.DB
	depth   uint64
	dropped dropCounts
}

// OpenSQLite opens the spool file at path, creating it (with a new epoch)
// when it does not exist. maxRecords bounds the spool; 0 means
// DefaultMaxRecords.
func OpenSQLite(ctx context.Context, path string, maxRecords uint64) (*SQLite, error) {
	return OpenSQLiteOptions(ctx, path, SQLiteOptions{MaxRecords: maxRecords})
}

// SQLiteOptions bound a SQLite spool.
type SQLiteOptions struct {
	// MaxRecords bounds the records held; 0 means DefaultMaxRecords.
	MaxRecords uint64
	// MaxBytes bounds the spool file (SQLite's max_page_count). A full
	// file is met by dropping records by the policy in the package doc and
	// retrying, so appends go on working. The WAL beside the file is
	// checkpointed every MaxBytes/4 and cut back to that size, but holds up
	// to about MaxBytes again during a burst: give the bound at most half
	// the filesystem's free space. A disk that fills before the bound does
	// leaves SQLite no room even for the deletes, and appends fail (the
	// queue counts the lost batches). 0 means no bound but the disk's. At
	// least MinMaxBytes.
	MaxBytes uint64
}

// MinMaxBytes is the smallest SQLiteOptions.MaxBytes: the schema and a
// few batches must fit.
const MinMaxBytes = 256 << 10

// pageSize is the spool file's page size (SQLite's default, set
// explicitly so MaxBytes converts to pages the same way everywhere).
const pageSize = 4096

// OpenSQLiteOptions is OpenSQLite with every bound.
func OpenSQLiteOptions(ctx context.Context, path string, o SQLiteOptions) (*SQLite, error) {
	if o.MaxRecords == 0 {
		o.MaxRecords = DefaultMaxRecords
	}
	if o.MaxBytes != 0 && o.MaxBytes < MinMaxBytes {
		return nil, fmt.Errorf("open spool %s: a bound of %d bytes is too small; use at least %d", path, o.MaxBytes, MinMaxBytes)
	}
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(5000)")
	q.Add("_pragma", fmt.Sprintf("page_size(%d)", pageSize))
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(NORMAL)")
	if o.MaxBytes != 0 {
		// On every connection the pool may open, not just the first.
		q.Add("_pragma", fmt.Sprintf("max_page_count(%d)", o.MaxBytes/pageSize))
		// The WAL beside the file is bounded too: checkpointed every
		// quarter of the bound (SQLite's default is 1000 pages, 4 MB,
		// more than a small bound) and cut back to that size after.
		q.Add("_pragma", fmt.Sprintf("wal_autocheckpoint(%d)", max(o.MaxBytes/pageSize/4, 16)))
		q.Add("_pragma", fmt.Sprintf("journal_size_limit(%d)", o.MaxBytes/4))
	}
	dsn := "file:" + (&url.URL{Path: path}).EscapedPath() + "?" + q.Encode()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open spool %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	s := &SQLite{path: path, max: o.MaxRecords, maxBytes: o.MaxBytes, db: db, dropped: dropCounts{}}
	if err := s.init(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open spool %s: %w (if the file is damaged, move it aside; the agent starts a new spool)", path, err)
	}
	return s, nil
}

func (s *SQLite) init(ctx context.Context) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	stmts := []string{
		`CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)`,
		// AUTOINCREMENT, so a seq is never given out twice even after the
		// newest records were deleted.
		`CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL, body BLOB NOT NULL)`,
		// Only the rare classes (events, raw samples) are indexed by kind,
		// for ReadPriority and the drop policy: an index over every
		// inference record would cost each insert a second B-tree write.
		// Inference records are found by walking seq order, where they are
		// nearly all there is. (Spools from before had a full index.)
		`DROP INDEX IF EXISTS records_kind_seq`,
		`CREATE INDEX IF NOT EXISTS records_rare ON records (kind, seq) WHERE kind <> 1`,
	}
	for _, st := range stmts {
		if _, err := tx.ExecContext(ctx, st); err != nil {
			return err
		}
	}
	meta := map[string]string{}
	rows, err := tx.QueryContext(ctx, `SELECT key, value FROM meta`)
	if err != nil {
		return err
	}
	for rows.Next() {
		var k, v string
		if err := rows.Scan(&k, &v); err != nil {
			rows.Close()
			return err
		}
		meta[k] = v
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	if v, ok := meta["schema"]; ok {
		n, err := strconv.Atoi(v)
		if err != nil || n > schemaVersion {
			return fmt.Errorf("spool schema version %q is newer than this agent's %d; upgrade the agent", v, schemaVersion)
		}
	}
	s.epoch = meta["epoch"]
	if s.epoch == "" {
		s.epoch = newEpoch()
	}
	for _, k := range dropOrder {
		if v := meta[k.metaKey()]; v != "" {
			if s.dropped[k], err = strconv.ParseUint(v, 10, 64); err != nil {
				return fmt.Errorf("spool meta %s=%q is not a count", k.metaKey(), v)
			}
		}
	}
	// A spool written before the per-class counters has only the total;
	// it was all inference records then.
	if v := meta["dropped"]; v != "" && meta[kindInference.metaKey()] == "" {
		if s.dropped[kindInference], err = strconv.ParseUint(v, 10, 64); err != nil {
			return fmt.Errorf("spool meta dropped=%q is not a count", v)
		}
	}
	for k, v := range map[string]string{"schema": strconv.Itoa(schemaVersion), "epoch": s.epoch} {
		if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)`, k, v); err != nil {
			return err
		}
	}
	if err := tx.QueryRowContext(ctx, `SELECT COUNT(*) FROM records`).Scan(&s.depth); err != nil {
		return err
	}
	return tx.Commit()
}

// Path returns the spool file's path.
func (s *SQLite) Path() string { return s.path }

// Epoch returns the spool's random id, fixed when the file was created.
func (s *SQLite) Epoch() string { return s.epoch }

// Append stores recs in one transaction and sets each record's Seq. When the
// spool goes over its bound, the oldest records are dropped as the package
// doc says.
func (s *SQLite) Append(ctx context.Context, recs []*pb.TelemetryRecord) error {
	if len(recs) == 0 {
		return nil
	}
	if err := checkRecords(recs); err != nil {
		return err
	}
	bodies := make([][]byte, len(recs))
	for i, r := range recs {
		// Seq lives in its own column; keep it out of the blob (Append sets
		// it anyway).
		r.Seq = 0
		b, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
		if err != nil {
			return fmt.Errorf("spool append: record %d: %w", i, err)
		}
		bodies[i] = b
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.db == nil {
		return ErrClosed
	}
	// A full file (MaxBytes) or disk: make room by the drop policy and try
	// again, a bigger cut each time, until the batch fits or nothing but
	// the batch is left to drop.
	var room uint64
	for attempt := 0; ; attempt++ {
		err := s.appendLocked(ctx, recs, bodies, room)
		if err == nil || !isFull(err) {
			return err
		}
		if room >= s.depth || attempt >= 16 {
			// The drops were in the failed transaction: nothing was lost
			// but this batch, which the caller counts.
			return fmt.Errorf("%w (the batch does not fit even after dropping %d of the %d records held; nothing was dropped); free disk space or raise --spool-max-bytes", err, room, s.depth)
		}
		room = max(2*room, uint64(len(recs)), s.depth/32)
	}
}

// appendLocked inserts the batch in one transaction, first dropping room
// records (by the policy) to make space for it.
func (s *SQLite) appendLocked(ctx context.Context, recs []*pb.TelemetryRecord, bodies [][]byte, room uint64) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("spool append: %w", err)
	}
	defer tx.Rollback()
	now := dropCounts{}
	var dropped uint64
	if room > 0 {
		if dropped, err = s.dropLocked(ctx, tx, room, now); err != nil {
			return err
		}
	}
	// One prepared statement per batch: preparing per row costs more than
	// the insert itself. The rows are inserted without the caller's
	// cancellation: with a cancellable context the driver starts a watcher
	// goroutine per statement, which also costs more than the insert. A
	// batch is short, and ctx is still honoured by BeginTx above and by the
	// deletes below.
	rowCtx := context.WithoutCancel(ctx)
	ins, err := tx.PrepareContext(rowCtx, `INSERT INTO records (kind, body) VALUES (?, ?)`)
	if err != nil {
		return fmt.Errorf("spool append: %w", err)
	}
	defer ins.Close()
	seqs := make([]uint64, len(recs))
	for i, r := range recs {
		res, err := ins.ExecContext(rowCtx, int(kindOf(r)), bodies[i])
		if err != nil {
			return fmt.Errorf("spool append: %w", err)
		}
		// The rowid is the seq (INTEGER PRIMARY KEY); one connection, so
		// no other insert can come between.
		seq, err := res.LastInsertId()
		if err != nil {
			return fmt.Errorf("spool append: %w", err)
		}
		seqs[i] = uint64(seq)
	}
	depth := s.depth + uint64(len(recs)) - dropped
	if depth > s.max {
		n, err := s.dropLocked(ctx, tx, depth-s.max, now)
		if err != nil {
			return err
		}
		dropped += n
		depth -= n
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("spool append: %w", err)
	}
	for i, r := range recs {
		r.Seq = seqs[i]
	}
	s.depth = depth
	for k, n := range now {
		s.dropped[k] += n
	}
	return nil
}

// dropLocked deletes up to excess records by the drop policy within tx,
// adds them to now and stores the new counters (committed with tx).
func (s *SQLite) dropLocked(ctx context.Context, tx *sql.Tx, excess uint64, now dropCounts) (uint64, error) {
	var dropped uint64
	for _, k := range dropOrder {
		if excess == 0 {
			break
		}
		q := `DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE kind <> 1 AND kind = ? ORDER BY seq LIMIT ?)`
		if k == kindInference {
			q = `DELETE FROM records WHERE seq IN (SELECT seq FROM records WHERE kind = ? ORDER BY seq LIMIT ?)`
		}
		res, err := tx.ExecContext(ctx, q, int(k), int64(excess))
		if err != nil {
			return 0, fmt.Errorf("spool append: drop oldest: %w", err)
		}
		n, _ := res.RowsAffected()
		if n == 0 {
			continue
		}
		excess -= uint64(n)
		dropped += uint64(n)
		now[k] += uint64(n)
		if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)`,
			k.metaKey(), strconv.FormatUint(s.dropped[k]+now[k], 10)); err != nil {
			return 0, fmt.Errorf("spool append: %w", err)
		}
	}
	return dropped, nil
}

// sqliteFull is SQLite's result code for a full database or disk.
const sqliteFull = 13

// isFull reports whether err is SQLite's "database or disk is full".
func isFull(err error) bool {
	var se interface{ Code() int }
	return errors.As(err, &se) && se.Code()&0xff == sqliteFull
}

// ReadPriority returns up to limit health and rollout events with
// from <= seq <= to, in seq order: what the sender puts first after a
// reconnect.
func (s *SQLite) ReadPriority(ctx context.Context, from, to uint64, limit int) ([]*pb.TelemetryRecord, error) {
	return s.read(ctx, `SELECT seq, body FROM records WHERE kind <> 1 AND kind = 2 AND seq >= ? AND seq <= ? ORDER BY seq LIMIT ?`, from, to, limit)
}

// Read returns up to limit records with from <= seq <= to, in seq order.
func (s *SQLite) Read(ctx context.Context, from, to uint64, limit int) ([]*pb.TelemetryRecord, error) {
	return s.read(ctx, `SELECT seq, body FROM records WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT ?`, from, to, limit)
}

func (s *SQLite) read(ctx context.Context, query string, from, to uint64, limit int) ([]*pb.TelemetryRecord, error) {
	if limit <= 0 || from > to {
		return nil, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.db == nil {
		return nil, ErrClosed
	}
	rows, err := s.db.QueryContext(ctx, query, clampSeq(from), clampSeq(to), limit)
	if err != nil {
		return nil, fmt.Errorf("spool read: %w", err)
	}
	defer rows.Close()
	var out []*pb.TelemetryRecord
	for rows.Next() {
		var seq int64
		var body []byte
		if err := rows.Scan(&seq, &body); err != nil {
			return nil, fmt.Errorf("spool read: %w", err)
		}
		r := &pb.TelemetryRecord{}
		if len(body) > maxRecordBody {
			return nil, fmt.Errorf("spool read: record %d is %d bytes, over the %d byte cap: the spool file is damaged; move %s aside", seq, len(body), maxRecordBody, s.path)
		}
		if err := proto.Unmarshal(body, r); err != nil {
			return nil, fmt.Errorf("spool read: record %d: %w: the spool file is damaged; move %s aside", seq, err, s.path)
		}
		r.Seq = uint64(seq)
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("spool read: %w", err)
	}
	return out, nil
}

// Delete removes the records whose seqs lie in ranges and returns how many
// it removed. Seqs that are not in the spool are skipped.
func (s *SQLite) Delete(ctx context.Context, ranges []*pb.SeqRange) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.db == nil {
		return 0, ErrClosed
	}
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("spool delete: %w", err)
	}
	defer tx.Rollback()
	var n int64
	for _, r := range ranges {
		if r.GetFirst() > r.GetLast() {
			continue
		}
		res, err := tx.ExecContext(ctx, `DELETE FROM records WHERE seq >= ? AND seq <= ?`, clampSeq(r.GetFirst()), clampSeq(r.GetLast()))
		if err != nil {
			return 0, fmt.Errorf("spool delete: %w", err)
		}
		k, _ := res.RowsAffected()
		n += k
	}
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("spool delete: %w", err)
	}
	s.depth -= uint64(n)
	return int(n), nil
}

// Stats returns the spool's depth, drop count and last seq.
func (s *SQLite) Stats(ctx context.Context) (Stats, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.db == nil {
		return Stats{}, ErrClosed
	}
	st := Stats{Depth: s.depth}
	s.dropped.stats(&st)
	// sqlite_sequence holds the AUTOINCREMENT high-water mark, which stays
	// put when the newest records are deleted.
	var last sql.NullInt64
	err := s.db.QueryRowContext(ctx, `SELECT seq FROM sqlite_sequence WHERE name = 'records'`).Scan(&last)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return Stats{}, fmt.Errorf("spool stats: %w", err)
	}
	st.LastSeq = uint64(last.Int64)
	return st, nil
}

// Close closes the file. Later calls return ErrClosed.
func (s *SQLite) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.db == nil {
		return nil
	}
	err := s.db.Close()
	s.db = nil
	return err
}

// clampSeq keeps a seq inside SQLite's signed 64-bit integers, so a range
// such as [n, MaxUint64] works.
func clampSeq(v uint64) int64 {
	if v > 1<<63-1 {
		return 1<<63 - 1
	}
	return int64(v)
}
