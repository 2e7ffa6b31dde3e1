package store

import (
	"context"
	"database/sql"
	"fmt"
)

// RolloutView is a rollout with its waves, step counts and history, all
// read from one snapshot of the database.
type RolloutView struct {
	Rollout Rollout
	Waves   []RolloutWave
	Counts  []StepCount
	// History is empty unless asked for.
	History []HistoryEntry
}

// RolloutView reads rollout id, its waves, its step counts and, with
// historyLimit > 0, the newest historyLimit lines of its history, in one
// read transaction. Read one after the other, the waves and the counts
// could straddle a commit: the engine ends a wave and starts the next in
// one transaction, and a reader would see every device of the wave done
// and the next wave not started, a state that never was. The error wraps
// ErrNotFound if the rollout is unknown.
func (s *Store) RolloutView(ctx context.Context, id string, historyLimit int) (RolloutView, error) {
	// Read only: a plain BEGIN, which in WAL mode takes no write lock
	// (not the store's BEGIN IMMEDIATE), so it never waits for writers.
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return RolloutView{}, fmt.Errorf("rollout %q: begin read: %w", id, err)
	}
	defer tx.Rollback()
	var v RolloutView
	if v.Rollout, err = getRollout(ctx, tx, id); err != nil {
		return RolloutView{}, err
	}
	if v.Waves, err = rolloutWaves(ctx, tx, id); err != nil {
		return RolloutView{}, err
	}
	if v.Counts, err = rolloutStepCounts(ctx, tx, id); err != nil {
		return RolloutView{}, err
	}
	if historyLimit > 0 {
		if v.History, err = rolloutHistory(ctx, tx, id, historyLimit); err != nil {
			return RolloutView{}, err
		}
	}
	return v, nil
}
