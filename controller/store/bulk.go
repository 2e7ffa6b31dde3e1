package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"strings"
)

// bulkRows bounds the rows of one multi-row statement. A rollout wave
// writes thousands of rows in one transaction; one statement per row costs
// more in the driver than in SQLite, so rows go in groups.
const bulkRows = 200

// bulk executes one statement shape over many rows, bulkRows at a time:
// head, then "(?, ?, ...), (...)" with cols placeholders per row, then
// tail. Prepared statements are kept per row count for the transaction.
type bulk struct {
	tx         *sql.Tx
	head, tail string
	cols       int
	stmts      map[int]*sql.Stmt
}

func newBulk(tx *sql.Tx, head string, cols int, tail string) *bulk {
	return &bulk{tx: tx, head: head, tail: tail, cols: cols, stmts: map[int]*sql.Stmt{}}
}

func (b *bulk) stmt(ctx context.Context, rows int) (*sql.Stmt, error) {
	if s := b.stmts[rows]; s != nil {
		return s, nil
	}
	one := "(" + strings.TrimSuffix(strings.Repeat("?,", b.cols), ",") + ")"
	q := b.head + " " + strings.TrimSuffix(strings.Repeat(one+",", rows), ",") + " " + b.tail
	s, err := b.tx.PrepareContext(ctx, q)
	if err != nil {
		return nil, err
	}
	b.stmts[rows] = s
	return s, nil
}

// exec runs the statement over rows; each row has b.cols values.
func (b *bulk) exec(ctx context.Context, rows [][]any) error {
	for start := 0; start < len(rows); start += bulkRows {
		chunk := rows[start:min(start+bulkRows, len(rows))]
		s, err := b.stmt(ctx, len(chunk))
		if err != nil {
			return err
		}
		args := make([]any, 0, len(chunk)*b.cols)
		for _, r := range chunk {
			if len(r) != b.cols {
				return fmt.Errorf("bulk statement: row of %d values, want %d", len(r), b.cols)
			}
			args = append(args, r...)
		}
		if _, err := s.ExecContext(ctx, args...); err != nil {
			return err
		}
	}
	return nil
}

func (b *bulk) close() {
	for _, s := range b.stmts {
		s.Close()
	}
}

// queryIn runs query, which ends in "IN (", for every id in ids, with args
// before them, and hands each row to scan. The ids travel as one JSON
// array (json_each), so a thousand ids cost one short statement to
// prepare rather than one placeholder each.
func queryIn(ctx context.Context, q queryerRows, query string, args []any, ids []string, scan func(*sql.Rows) error) error {
	list, err := json.Marshal(ids)
	if err != nil {
		return err
	}
	rows, err := q.QueryContext(ctx, query+"SELECT value FROM json_each(?))", append(append([]any(nil), args...), string(list))...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		if err := scan(rows); err != nil {
			return err
		}
	}
	return rows.Err()
}

type queryerRows interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

func anys(ss []string) []any {
	out := make([]any, len(ss))
	for i, s := range ss {
		out[i] = s
	}
	return out
}
