package store

import (
	"context"
	"database/sql"
	"fmt"
)

// WithoutHello returns those of ids whose device has no row, or a row that
// lacks what only a hello stores: its platform (os and arch; a state may
// set the agent version, never these). The inventory asks such a device to
// say hello again (its resync command), since without the hello the
// controller knows neither its labels nor its platform.
func (s *Store) WithoutHello(ctx context.Context, ids []string) ([]string, error) {
	if len(ids) == 0 {
		return nil, nil
	}
	have := make(map[string]bool, len(ids))
	err := queryIn(ctx, s.db, `SELECT id FROM devices WHERE (os != '' OR arch != '') AND id IN (`, nil, ids, func(rows *sql.Rows) error {
		var id string
		if err := rows.Scan(&id); err != nil {
			return err
		}
		have[id] = true
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("devices without a hello: %w", err)
	}
	var out []string
	for _, id := range ids {
		if !have[id] {
			out = append(out, id)
		}
	}
	return out, nil
}
