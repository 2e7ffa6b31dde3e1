package spool

import (
	"database/sql"
	"fmt"
	"net/url"
	"path/filepath"
	"testing"

	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"google.golang.org/protobuf/proto"
)

// BenchmarkAppendVsRaw compares the spool's batched Append with the
// plainest loop that writes the same rows to SQLite: a raw modernc.org/sqlite
// connection with the spool's pragmas, one transaction per batch, one
// prepared INSERT per row of the same (kind, body) bytes. The raw loop is
// the ceiling; BENCHMARKS.md holds the ratio (the goal is >= 0.8).
func BenchmarkAppendVsRaw(b *testing.B) {
	for _, size := range []int{64, 256} {
		b.Run(fmt.Sprintf("spool/batch=%d", size), func(b *testing.B) {
			s, err := OpenSQLite(b.Context(), filepath.Join(b.TempDir(), "spool.db"), 0)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			batch := make([]*pb.TelemetryRecord, size)
			for b.Loop() {
				for i := range batch {
					batch[i] = inf("m", i)
				}
				if err := s.Append(b.Context(), batch); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*size)/b.Elapsed().Seconds(), "records/s")
		})
		b.Run(fmt.Sprintf("raw/batch=%d", size), func(b *testing.B) {
			q := url.Values{}
			q.Add("_pragma", "busy_timeout(5000)")
			q.Add("_pragma", "journal_mode(WAL)")
			q.Add("_pragma", "synchronous(NORMAL)")
			db, err := sql.Open("sqlite", "file:"+filepath.Join(b.TempDir(), "raw.db")+"?"+q.Encode())
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			db.SetMaxOpenConns(1)
			if _, err := db.Exec(`CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind INTEGER NOT NULL, body BLOB NOT NULL)`); err != nil {
				b.Fatal(err)
			}
			batch := make([]*pb.TelemetryRecord, size)
			for b.Loop() {
				// The same work on the rows as the spool: build, marshal, insert.
				bodies := make([][]byte, size)
				for i := range batch {
					batch[i] = inf("m", i)
					if bodies[i], err = proto.Marshal(batch[i]); err != nil {
						b.Fatal(err)
					}
				}
				tx, err := db.Begin()
				if err != nil {
					b.Fatal(err)
				}
				st, err := tx.Prepare(`INSERT INTO records (kind, body) VALUES (?, ?)`)
				if err != nil {
					b.Fatal(err)
				}
				for i := range bodies {
					if _, err := st.Exec(1, bodies[i]); err != nil {
						b.Fatal(err)
					}
				}
				st.Close()
				if err := tx.Commit(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*size)/b.Elapsed().Seconds(), "records/s")
		})
	}
}
