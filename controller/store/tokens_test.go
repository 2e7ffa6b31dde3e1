package store

import (
	"context"
	"errors"
	"strings"
	"testing"
)

func TestTokens(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if n, err := s.CountTokens(ctx); err != nil || n != 0 {
		t.Fatalf("CountTokens on a new store = %d, %v", n, err)
	}
	if _, err := s.CreateToken(ctx, Token{Name: "ci", Role: "operator", Hash: "h1", CreatedBy: "admin"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateToken(ctx, Token{Name: "ci", Role: "viewer", Hash: "h2"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("second token named ci: %v, want ErrConflict", err)
	}
	got, err := s.TokenByHash(ctx, "h1")
	if err != nil || got.Name != "ci" || got.Role != "operator" || got.CreatedBy != "admin" || got.CreatedAt.IsZero() {
		t.Fatalf("TokenByHash(h1) = %+v, %v", got, err)
	}
	if _, err := s.TokenByHash(ctx, "h2"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("TokenByHash of an unknown hash: %v", err)
	}
	if err := s.RevokeToken(ctx, "ci"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.TokenByHash(ctx, "h1"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("revoked token still authenticates: %v", err)
	}
	if err := s.RevokeToken(ctx, "ci"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("revoking twice: %v", err)
	}
	// A revoked name stays taken: the audit log names tokens.
	if _, err := s.CreateToken(ctx, Token{Name: "ci", Role: "viewer", Hash: "h3"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("reusing a revoked name: %v", err)
	}
	ts, err := s.Tokens(ctx)
	if err != nil || len(ts) != 1 || ts[0].RevokedAt.IsZero() {
		t.Fatalf("Tokens = %+v, %v", ts, err)
	}
	if n, _ := s.CountTokens(ctx); n != 1 {
		t.Fatalf("CountTokens = %d, want 1 (revoked tokens count)", n)
	}
}

func TestAuditLog(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	for i, who := range []string{"alice", "ci", "alice", "ci", "alice"} {
		e, err := s.AppendAudit(ctx, AuditEntry{Who: who, Role: "operator", Action: "POST /v1/assignments", Target: "t", Status: 200 + i, Result: "ok"})
		if err != nil || e.ID == 0 || e.At.IsZero() {
			t.Fatalf("AppendAudit = %+v, %v", e, err)
		}
	}
	all, err := s.Audit(ctx, AuditQuery{})
	if err != nil || len(all) != 5 || all[0].Status != 204 || all[4].Status != 200 {
		t.Fatalf("Audit = %+v, %v; want 5 entries, newest first", all, err)
	}
	page, err := s.Audit(ctx, AuditQuery{Limit: 2, BeforeID: all[1].ID})
	if err != nil || len(page) != 2 || page[0].ID != all[2].ID || page[1].ID != all[3].ID {
		t.Fatalf("second page = %+v, %v", page, err)
	}
	ci, err := s.Audit(ctx, AuditQuery{Who: "ci"})
	if err != nil || len(ci) != 2 || ci[0].Who != "ci" || ci[1].Who != "ci" {
		t.Fatalf("ci's entries = %+v, %v", ci, err)
	}
	// Append-only, even for code that tries.
	for _, q := range []string{`UPDATE audit_log SET who = 'mallory'`, `DELETE FROM audit_log`} {
		if _, err := s.db.ExecContext(ctx, q); err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Errorf("%s: %v, want the append-only trigger to refuse", q, err)
		}
	}
}
