package store

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkStoreTelemetryBatches times one group commit of 64 batches (64 devices) of
// 256 inference records (one op), as ingest makes them under load.
func BenchmarkStoreTelemetryBatches(b *testing.B) {
	for _, body := range []int{0, 1536, 10 << 10} {
		b.Run(fmt.Sprintf("body=%d", body), func(b *testing.B) {
			ctx := context.Background()
			s, err := Open(ctx, filepath.Join(b.TempDir(), FileName))
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			raw := make([]byte, body)
			seq := uint64(0)
			b.ResetTimer()
			for range b.N {
				var group []TelemetryBatch
				for d := range 64 {
					recs := make([]TelemetryRecord, 256)
					for j := range recs {
						seq++
						recs[j] = TelemetryRecord{Seq: seq, Kind: RecordInference, Model: "grid-anomaly", Version: "1.4.2", At: t0.Add(time.Duration(seq) * time.Millisecond), LatencyUS: uint32(150 + j%90)}
					}
					tb := TelemetryBatch{DeviceID: fmt.Sprintf("dev-%d", d), Epoch: "0123456789abcdef0123456789abcdef", Seen: t0, Records: recs}
					if body > 0 {
						tb.Body, tb.Encoding = raw, BodyProto
					}
					group = append(group, tb)
				}
				if _, err := s.StoreTelemetryBatches(ctx, group); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*64*256)/b.Elapsed().Seconds(), "records/s")
		})
	}
}
