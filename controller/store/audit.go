package store

import (
	"context"
	"database/sql"
	"time"
)

// AuditEntry is one change attempted through the API: who (the token's
// name and role), what, on what, when, and how it ended. The table is
// append-only; triggers refuse UPDATE and DELETE.
type AuditEntry struct {
	ID int64
	At time.Time
	// Who is the token's name; Role the role it had.
	Who, Role string
	// Action is the request, e.g. "POST /v1/assignments".
	Action string
	// Target is what it acted on, e.g. "grid-anomaly@1.1.0 -> region=eu".
	Target string
	// Status is the HTTP status answered; Result is "ok" or what went wrong.
	Status int
	Result string
}

// MaxAuditPage bounds one page of Audit.
const MaxAuditPage = 1000

// AuditQuery selects audit entries, newest first.
type AuditQuery struct {
	// Limit is the page size: default 100, at most MaxAuditPage.
	Limit int
	// BeforeID, when not zero, returns entries older than that id (the
	// next page).
	BeforeID int64
	// Who, when set, keeps the entries of that token only.
	Who string
}

// AppendAudit adds an entry; its ID and, when zero, its time are set here.
func (s *Store) AppendAudit(ctx context.Context, e AuditEntry) (AuditEntry, error) {
	if e.At.IsZero() {
		e.At = s.now().UTC()
	}
	err := s.tx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `INSERT INTO audit_log (at_ms, who, role, action, target, status, result) VALUES (?, ?, ?, ?, ?, ?, ?)`,
			ms(e.At), e.Who, e.Role, e.Action, e.Target, e.Status, e.Result)
		if err != nil {
			return err
		}
		e.ID, err = res.LastInsertId()
		return err
	})
	return e, err
}

// Audit returns the entries q selects, newest first.
func (s *Store) Audit(ctx context.Context, q AuditQuery) ([]AuditEntry, error) {
	if q.Limit <= 0 {
		q.Limit = 100
	}
	if q.Limit > MaxAuditPage {
		q.Limit = MaxAuditPage
	}
	before := q.BeforeID
	if before <= 0 {
		before = 1<<63 - 1
	}
	rows, err := s.db.QueryContext(ctx, `
		SELECT id, at_ms, who, role, action, target, status, result FROM audit_log
		WHERE id < ? AND (? = '' OR who = ?)
		ORDER BY id DESC LIMIT ?`, before, q.Who, q.Who, q.Limit)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []AuditEntry
	for rows.Next() {
		var (
			e  AuditEntry
			at int64
		)
		if err := rows.Scan(&e.ID, &at, &e.Who, &e.Role, &e.Action, &e.Target, &e.Status, &e.Result); err != nil {
			return nil, err
		}
		e.At = fromMS(at)
		out = append(out, e)
	}
	return out, rows.Err()
}
