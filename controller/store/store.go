// Package store keeps the controller's state in SQLite (modernc.org/sqlite,
// pure Go): devices and what they report, models, each device's desired
// state and its generation counter, telemetry deduplicated by (device,
// spool epoch, seq) and folded into per-minute aggregates, deployment events, the broker's retained
// desired-state messages, staged rollouts with every device's step,
// operator API tokens (only their SHA-256) and the append-only audit log.
//
// The database runs in WAL mode with synchronous=FULL: the controller acks
// telemetry only after a commit, and the agent deletes what was acked, so a
// commit must survive a power cut, not only a crash of the process. Write
// transactions begin IMMEDIATE so two writers queue on busy_timeout instead
// of failing with SQLITE_BUSY when a read lock cannot be upgraded.
//
// The schema is versioned: migrations are ordered SQL scripts in this
// package, applied once each and recorded in schema_migrations.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// FileName is the database file's name inside the controller's data dir.
const FileName = "controller.db"

// Sentinel errors callers branch on.
var (
	// ErrNotFound is wrapped when the named row does not exist.
	ErrNotFound = errors.New("not found")
	// ErrConflict is wrapped when a write contradicts what is stored (a
	// model name@version already stored with another digest).
	ErrConflict = errors.New("conflict")
)

// Store is the SQLite-backed controller state. It is safe for concurrent use.
type Store struct {
	db  *sql.DB
	now func() time.Time
	tel telemetryStatements
	// telCache is telemetry.go's; only StoreTelemetryBatches and
	// PruneTelemetry touch it.
	telCache telemetryCache
}

// Option changes how Open sets up the store.
type Option func(*Store)

// WithClock makes the store read the time from now instead of time.Now, so
// tests control timestamps.
func WithClock(now func() time.Time) Option {
	return func(s *Store) { s.now = now }
}

// Open opens (creating if needed) the database at path and applies pending
// migrations.
func Open(ctx context.Context, path string, opts ...Option) (*Store, error) {
	q := url.Values{}
	q.Set("_busy_timeout", "10000")
	q.Set("_journal_mode", "WAL")
	q.Set("_foreign_keys", "1")
	q.Set("_synchronous", "FULL")
	q.Set("_txlock", "immediate")
	// A rollout wave touches thousands of rows of several tables and
	// indexes in one transaction; SQLite's default 2 MB page cache would
	// read many of them back from the file.
	q.Add("_pragma", "cache_size(-65536)")
	// Multi-row upserts keep a statement journal; in memory, not in a
	// temporary file written with a system call per page.
	q.Add("_pragma", "temp_store(MEMORY)")
	dsn := "file:" + path + "?" + q.Encode()
	db, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	s := &Store{db: db, now: time.Now}
	for _, o := range opts {
		o(s)
	}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("open database %s: %w (is the data directory writable?)", path, err)
	}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	return s, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// SchemaVersion returns the highest migration applied.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var v int
	err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v)
	return v, err
}

// migrations are applied in order; migration i brings the schema to version
// i+1. Never edit one that has shipped: append a new one.
var migrations = []string{
	// 1: the walking skeleton's schema.
	`
CREATE TABLE devices (
	id                  TEXT PRIMARY KEY,
	labels              TEXT NOT NULL DEFAULT '{}',
	agent_version       TEXT NOT NULL DEFAULT '',
	os                  TEXT NOT NULL DEFAULT '',
	arch                TEXT NOT NULL DEFAULT '',
	online              INTEGER NOT NULL DEFAULT 0,
	last_seen_ms        INTEGER NOT NULL DEFAULT 0,
	reported            BLOB,
	health              TEXT NOT NULL DEFAULT 'unknown',
	reported_generation INTEGER NOT NULL DEFAULT 0,
	spool_depth         INTEGER NOT NULL DEFAULT 0,
	generation          INTEGER NOT NULL DEFAULT 0,
	inferences          INTEGER NOT NULL DEFAULT 0,
	inference_errors    INTEGER NOT NULL DEFAULT 0,
	created_ms          INTEGER NOT NULL
);

CREATE TABLE models (
	name       TEXT NOT NULL,
	version    TEXT NOT NULL,
	digest     TEXT NOT NULL UNIQUE,
	size       INTEGER NOT NULL,
	manifest   TEXT NOT NULL,
	created_ms INTEGER NOT NULL,
	PRIMARY KEY (name, version)
);

CREATE TABLE desired_states (
	device_id  TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
	generation INTEGER NOT NULL,
	issued_ms  INTEGER NOT NULL,
	doc        BLOB NOT NULL,
	published  INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE desired_slots (
	device_id     TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
	slot          TEXT NOT NULL,
	model_name    TEXT NOT NULL,
	model_version TEXT NOT NULL,
	digest        TEXT NOT NULL,
	size          INTEGER NOT NULL,
	PRIMARY KEY (device_id, slot),
	FOREIGN KEY (model_name, model_version) REFERENCES models(name, version)
);

CREATE TABLE telemetry (
	device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
	spool_epoch TEXT NOT NULL,
	seq         INTEGER NOT NULL,
	kind        TEXT NOT NULL,
	model       TEXT NOT NULL DEFAULT '',
	version     TEXT NOT NULL DEFAULT '',
	at_ms       INTEGER NOT NULL,
	latency_us  INTEGER NOT NULL DEFAULT 0,
	error       TEXT NOT NULL DEFAULT '',
	received_ms INTEGER NOT NULL,
	PRIMARY KEY (device_id, spool_epoch, seq)
) WITHOUT ROWID;

CREATE TABLE events (
	id         INTEGER PRIMARY KEY AUTOINCREMENT,
	device_id  TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
	kind       TEXT NOT NULL,
	slot       TEXT NOT NULL DEFAULT '',
	model      TEXT NOT NULL DEFAULT '',
	version    TEXT NOT NULL DEFAULT '',
	generation INTEGER NOT NULL DEFAULT 0,
	rollout_id TEXT NOT NULL DEFAULT '',
	detail     TEXT NOT NULL DEFAULT '',
	at_ms      INTEGER NOT NULL
);
CREATE INDEX events_by_device ON events (device_id, at_ms DESC, id DESC);

CREATE TABLE mqtt_retained (
	topic      TEXT PRIMARY KEY,
	payload    BLOB NOT NULL,
	qos        INTEGER NOT NULL,
	created_ms INTEGER NOT NULL
);
`,
	// 2: staged rollouts. Desired slots remember the rollout that set
	// them, whether they roll back, and the health policy, so a later
	// change to another slot of the device re-issues them unchanged.
	`
ALTER TABLE desired_slots ADD COLUMN rollout_id TEXT NOT NULL DEFAULT '';
ALTER TABLE desired_slots ADD COLUMN rollback INTEGER NOT NULL DEFAULT 0;
ALTER TABLE desired_slots ADD COLUMN health TEXT NOT NULL DEFAULT '';

-- Gates read one model version's inferences over a time window.
CREATE INDEX telemetry_by_version ON telemetry (model, version, at_ms) WHERE kind = 'inference';
-- A restarted controller replays the events of its open rollouts.
CREATE INDEX events_by_rollout ON events (rollout_id, id);

CREATE TABLE rollouts (
	id          TEXT PRIMARY KEY,
	spec        TEXT NOT NULL,
	slot        TEXT NOT NULL,
	model       TEXT NOT NULL,
	version     TEXT NOT NULL,
	phase       TEXT NOT NULL,
	wave        INTEGER NOT NULL DEFAULT 0,
	reason      TEXT NOT NULL DEFAULT '',
	targets     INTEGER NOT NULL DEFAULT 0,
	open        INTEGER NOT NULL DEFAULT 1,
	revision    INTEGER NOT NULL,
	created_ms  INTEGER NOT NULL,
	updated_ms  INTEGER NOT NULL,
	finished_ms INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE rollout_waves (
	rollout_id  TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
	idx         INTEGER NOT NULL,
	spec_idx    INTEGER NOT NULL,
	size        INTEGER NOT NULL,
	state       TEXT NOT NULL,
	approved    INTEGER NOT NULL DEFAULT 0,
	override    INTEGER NOT NULL DEFAULT 0,
	started_ms  INTEGER NOT NULL DEFAULT 0,
	finished_ms INTEGER NOT NULL DEFAULT 0,
	verdicts    TEXT NOT NULL DEFAULT '',
	PRIMARY KEY (rollout_id, idx)
) WITHOUT ROWID;

CREATE TABLE rollout_devices (
	rollout_id   TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
	device_id    TEXT NOT NULL,
	wave         INTEGER NOT NULL,
	ord          INTEGER NOT NULL,
	stratum      TEXT NOT NULL DEFAULT '',
	step         TEXT NOT NULL,
	step_ms      INTEGER NOT NULL DEFAULT 0,
	deadline_ms  INTEGER NOT NULL DEFAULT 0,
	activated_ms INTEGER NOT NULL DEFAULT 0,
	generation   INTEGER NOT NULL DEFAULT 0,
	prev_model   TEXT NOT NULL DEFAULT '',
	prev_version TEXT NOT NULL DEFAULT '',
	prev_digest  TEXT NOT NULL DEFAULT '',
	prev_size    INTEGER NOT NULL DEFAULT 0,
	failure      TEXT NOT NULL DEFAULT '',
	detail       TEXT NOT NULL DEFAULT '',
	PRIMARY KEY (rollout_id, device_id)
) WITHOUT ROWID;
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id);

CREATE TABLE rollout_history (
	id         INTEGER PRIMARY KEY AUTOINCREMENT,
	rollout_id TEXT NOT NULL REFERENCES rollouts(id) ON DELETE CASCADE,
	at_ms      INTEGER NOT NULL,
	message    TEXT NOT NULL
);
CREATE INDEX rollout_history_by_rollout ON rollout_history (rollout_id, id);
`,
	// 3: operator API tokens (only their SHA-256 is stored) and the
	// append-only audit log of every change made through the API.
	`
CREATE TABLE api_tokens (
	name       TEXT PRIMARY KEY,
	role       TEXT NOT NULL,
	hash       TEXT NOT NULL UNIQUE,
	created_by TEXT NOT NULL DEFAULT '',
	created_ms INTEGER NOT NULL,
	revoked_ms INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE audit_log (
	id     INTEGER PRIMARY KEY AUTOINCREMENT,
	at_ms  INTEGER NOT NULL,
	who    TEXT NOT NULL,
	role   TEXT NOT NULL,
	action TEXT NOT NULL,
	target TEXT NOT NULL,
	status INTEGER NOT NULL,
	result TEXT NOT NULL
);
CREATE INDEX audit_log_by_who ON audit_log (who, id);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
	BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
	BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
`,
	// 4: telemetry at fleet rates (see telemetry.go). A row per record
	// capped ingest far below the broker's rate; now the seqs stored per
	// (device, epoch) are kept as disjoint ranges (the dedupe), the raw
	// records as one row per batch, and inferences as aggregates per
	// device per minute. Seqs are stored as seq XOR 2^63, which keeps
	// their order as signed integers. The old per-record rows become
	// one-seq ranges, so records stored before the upgrade stay deduped;
	// their figures are not carried over.
	`
CREATE TABLE telemetry_seqs (
	device_id   TEXT NOT NULL,
	spool_epoch TEXT NOT NULL,
	first       INTEGER NOT NULL,
	last        INTEGER NOT NULL,
	PRIMARY KEY (device_id, spool_epoch, first)
) WITHOUT ROWID;
INSERT INTO telemetry_seqs (device_id, spool_epoch, first, last)
	SELECT device_id, spool_epoch, k, k FROM (
		SELECT device_id, spool_epoch,
			CASE WHEN seq >= 0 THEN seq + (-9223372036854775807 - 1) ELSE seq - (-9223372036854775807 - 1) END AS k
		FROM telemetry);
DROP INDEX telemetry_by_version;
DROP TABLE telemetry;

CREATE TABLE telemetry_batches (
	id          INTEGER PRIMARY KEY,
	device_id   TEXT NOT NULL,
	spool_epoch TEXT NOT NULL,
	first_seq   INTEGER NOT NULL,
	last_seq    INTEGER NOT NULL,
	records     INTEGER NOT NULL,
	inferences  INTEGER NOT NULL,
	seqs        BLOB NOT NULL,
	encoding    INTEGER NOT NULL DEFAULT 0,
	body        BLOB,
	received_ms INTEGER NOT NULL
);
CREATE INDEX telemetry_batches_by_device ON telemetry_batches (device_id, id);
CREATE INDEX telemetry_batches_by_time ON telemetry_batches (received_ms);

CREATE TABLE telemetry_minutes (
	device_id  TEXT NOT NULL,
	model      TEXT NOT NULL,
	version    TEXT NOT NULL,
	source     INTEGER NOT NULL,
	slot       TEXT NOT NULL,
	rollout_id TEXT NOT NULL,
	minute_ms  INTEGER NOT NULL,
	count      INTEGER NOT NULL,
	errors     INTEGER NOT NULL,
	agg        BLOB NOT NULL,
	PRIMARY KEY (device_id, model, version, source, slot, rollout_id, minute_ms)
) WITHOUT ROWID;
CREATE INDEX telemetry_minutes_by_version ON telemetry_minutes (model, version, minute_ms);
CREATE INDEX telemetry_minutes_by_time ON telemetry_minutes (minute_ms);
`,
	// 5: how long each wave's decision took (RolloutWave.DecidedAfter);
	// -1 where it was not measured.
	`
ALTER TABLE rollout_waves ADD COLUMN decided_after_us INTEGER NOT NULL DEFAULT -1;
`,
}

func (s *Store) migrate(ctx context.Context) error {
	if _, err := s.db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
		version    INTEGER PRIMARY KEY,
		applied_ms INTEGER NOT NULL
	)`); err != nil {
		return fmt.Errorf("create schema_migrations: %w", err)
	}
	have, err := s.SchemaVersion(ctx)
	if err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if have > len(migrations) {
		return fmt.Errorf("schema version %d is newer than this controller knows (%d): run a newer controller or restore a backup", have, len(migrations))
	}
	for v := have + 1; v <= len(migrations); v++ {
		err := s.tx(ctx, func(tx *sql.Tx) error {
			if _, err := tx.ExecContext(ctx, migrations[v-1]); err != nil {
				return err
			}
			_, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied_ms) VALUES (?, ?)`, v, s.now().UnixMilli())
			return err
		})
		if err != nil {
			return fmt.Errorf("apply migration %d: %w", v, err)
		}
	}
	return nil
}

// tx runs fn in a write transaction and commits it if fn returns nil.
func (s *Store) tx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	if err := fn(tx); err != nil {
		_ = tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

func ms(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func fromMS(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return time.UnixMilli(v).UTC()
}
