package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Token is an operator API token as stored: only the SHA-256 of its
// secret, never the secret, so a copy of the database grants nothing.
type Token struct {
	// Name is unique; the audit log records it as who acted.
	Name string
	// Role is viewer, operator or admin (see controller/access).
	Role string
	// Hash is the SHA-256 of the token's secret, lowercase hex.
	Hash      string
	CreatedBy string
	CreatedAt time.Time
	// RevokedAt is zero while the token is valid.
	RevokedAt time.Time
}

// CreateToken stores a new token. A name already taken, by a valid or a
// revoked token, wraps ErrConflict: audit entries name tokens, so a name
// is never reused for someone else.
func (s *Store) CreateToken(ctx context.Context, t Token) (Token, error) {
	t.CreatedAt = s.now().UTC()
	err := s.tx(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO api_tokens (name, role, hash, created_by, created_ms) VALUES (?, ?, ?, ?, ?)`,
			t.Name, t.Role, t.Hash, t.CreatedBy, ms(t.CreatedAt))
		if err != nil && strings.Contains(err.Error(), "UNIQUE") {
			return fmt.Errorf("token name %q is taken; choose another name: %w", t.Name, ErrConflict)
		}
		return err
	})
	if err != nil {
		return Token{}, err
	}
	return t, nil
}

// TokenByHash returns the valid (not revoked) token whose secret hashes to
// hash; ErrNotFound if there is none.
func (s *Store) TokenByHash(ctx context.Context, hash string) (Token, error) {
	t, err := scanToken(s.db.QueryRowContext(ctx, `SELECT name, role, hash, created_by, created_ms, revoked_ms FROM api_tokens WHERE hash = ? AND revoked_ms = 0`, hash))
	if errors.Is(err, sql.ErrNoRows) {
		return Token{}, fmt.Errorf("token: %w", ErrNotFound)
	}
	return t, err
}

// Tokens lists every token, revoked ones included, by name.
func (s *Store) Tokens(ctx context.Context) ([]Token, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT name, role, hash, created_by, created_ms, revoked_ms FROM api_tokens ORDER BY name`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Token
	for rows.Next() {
		t, err := scanToken(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, rows.Err()
}

// CountTokens returns how many tokens exist, revoked ones included: the
// controller creates its first admin token only into an empty table.
func (s *Store) CountTokens(ctx context.Context) (int, error) {
	var n int
	err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM api_tokens`).Scan(&n)
	return n, err
}

// RevokeToken revokes the named token. ErrNotFound if no valid token has
// that name.
func (s *Store) RevokeToken(ctx context.Context, name string) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE api_tokens SET revoked_ms = ? WHERE name = ? AND revoked_ms = 0`, s.now().UnixMilli(), name)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return fmt.Errorf("token %q: %w", name, ErrNotFound)
		}
		return nil
	})
}

type tokenScanner interface{ Scan(dest ...any) error }

func scanToken(r tokenScanner) (Token, error) {
	var (
		t                  Token
		created, revokedMS int64
	)
	if err := r.Scan(&t.Name, &t.Role, &t.Hash, &t.CreatedBy, &created, &revokedMS); err != nil {
		return Token{}, err
	}
	t.CreatedAt, t.RevokedAt = fromMS(created), fromMS(revokedMS)
	return t, nil
}
