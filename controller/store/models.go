package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// Model is one model version the controller can assign. Its bundle file is
// stored content-addressed by Digest.
type Model struct {
	Name    string
	Version string
	// Digest is the SHA-256 of the bundle file, lowercase hex.
	Digest string
	Size   int64
	// Manifest is the bundle's manifest.json as stored in the bundle.
	Manifest  []byte
	CreatedAt time.Time
}

// PutModel stores m unless it is already there. It returns the stored model
// and whether this call created it. If name@version is stored with another
// digest, the error wraps ErrConflict and the stored model is returned.
func (s *Store) PutModel(ctx context.Context, m Model) (Model, bool, error) {
	var (
		stored  Model
		created bool
	)
	err := s.tx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `
			INSERT INTO models (name, version, digest, size, manifest, created_ms) VALUES (?, ?, ?, ?, ?, ?)
			ON CONFLICT DO NOTHING`,
			m.Name, m.Version, m.Digest, m.Size, string(m.Manifest), s.now().UnixMilli())
		if err != nil {
			return fmt.Errorf("model %s@%s: %w", m.Name, m.Version, err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return err
		}
		created = n == 1
		stored, err = getModel(ctx, tx, `name = ? AND version = ?`, m.Name, m.Version)
		if errors.Is(err, ErrNotFound) {
			// The digest is stored under another name@version. The digest
			// covers the manifest, so this means the bundle file differs
			// only outside it, which Decode does not produce.
			stored, err = getModel(ctx, tx, `digest = ?`, m.Digest)
			if err == nil {
				return fmt.Errorf("bundle %s is already stored as %s@%s: %w", m.Digest, stored.Name, stored.Version, ErrConflict)
			}
		}
		return err
	})
	if err != nil {
		return stored, false, err
	}
	if stored.Digest != m.Digest {
		return stored, false, fmt.Errorf("model %s@%s is already stored with digest %s; publish the new bundle under a new version: %w",
			m.Name, m.Version, stored.Digest, ErrConflict)
	}
	return stored, created, nil
}

// Model returns name@version; the error wraps ErrNotFound if unknown.
func (s *Store) Model(ctx context.Context, name, version string) (Model, error) {
	m, err := getModel(ctx, s.db, `name = ? AND version = ?`, name, version)
	if err != nil {
		return Model{}, fmt.Errorf("model %s@%s: %w", name, version, err)
	}
	return m, nil
}

// Models returns every model, sorted by name and creation time.
func (s *Store) Models(ctx context.Context) ([]Model, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT name, version, digest, size, manifest, created_ms FROM models ORDER BY name, created_ms, version`)
	if err != nil {
		return nil, fmt.Errorf("list models: %w", err)
	}
	defer rows.Close()
	var out []Model
	for rows.Next() {
		m, err := scanModel(rows)
		if err != nil {
			return nil, fmt.Errorf("list models: %w", err)
		}
		out = append(out, m)
	}
	return out, rows.Err()
}

type queryer interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

func getModel(ctx context.Context, q queryer, where string, args ...any) (Model, error) {
	m, err := scanModel(q.QueryRowContext(ctx, `SELECT name, version, digest, size, manifest, created_ms FROM models WHERE `+where, args...))
	if errors.Is(err, sql.ErrNoRows) {
		return Model{}, ErrNotFound
	}
	return m, err
}

func scanModel(row interface{ Scan(...any) error }) (Model, error) {
	var m Model
	var manifest string
	var created int64
	if err := row.Scan(&m.Name, &m.Version, &m.Digest, &m.Size, &manifest, &created); err != nil {
		return Model{}, err
	}
	m.Manifest = []byte(manifest)
	m.CreatedAt = fromMS(created)
	return m, nil
}
