package agent

import (
	"io"
	"strings"
	"testing"
	"time"
)

func TestTelemetryConfig(t *testing.T) {
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	cases := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string
		check   func(Config) bool
	}{
		{"defaults", nil, nil, "", func(c Config) bool {
			return c.AggregateInterval == time.Minute && c.TelemetryCompression == "auto" && c.SpoolMaxBytes == 0
		}},
		{"flags", []string{"--aggregate-interval", "10s", "--telemetry-compression", "off", "--spool-max-bytes", "1048576"}, nil, "", func(c Config) bool {
			return c.AggregateInterval == 10*time.Second && c.TelemetryCompression == "off" && c.SpoolMaxBytes == 1<<20
		}},
		{"env", nil, map[string]string{"EDGEFLEET_AGGREGATE_INTERVAL": "5m", "EDGEFLEET_TELEMETRY_COMPRESSION": "zstd", "EDGEFLEET_SPOOL_MAX_BYTES": "300000"}, "", func(c Config) bool {
			return c.AggregateInterval == 5*time.Minute && c.TelemetryCompression == "zstd" && c.SpoolMaxBytes == 300000
		}},
		{"interval not dividing a minute", []string{"--aggregate-interval", "7s"}, nil, "aggregate_interval: 7s", nil},
		{"interval too short", []string{"--aggregate-interval", "100ms"}, nil, "aggregate_interval", nil},
		{"unknown compression", []string{"--telemetry-compression", "gzip"}, nil, `telemetry_compression: telemetry compression "gzip"`, nil},
		{"tiny spool file", []string{"--spool-max-bytes", "4096"}, nil, "spool_max_bytes: 4096 is too small", nil},
		{"bad env bytes", nil, map[string]string{"EDGEFLEET_SPOOL_MAX_BYTES": "1MB"}, "EDGEFLEET_SPOOL_MAX_BYTES", nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg, err := LoadConfig(append([]string{"--id", "d1"}, c.args...), env(c.env), io.Discard)
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("err %v, want %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !c.check(cfg) {
				t.Fatalf("config %+v", cfg)
			}
		})
	}
	// The zero value means the defaults, for callers that build a Config by hand.
	cfg := DefaultConfig()
	cfg.ID, cfg.AggregateInterval, cfg.TelemetryCompression = "d1", 0, ""
	if err := cfg.Validate(); err != nil {
		t.Fatalf("zero interval and compression: %v", err)
	}
	if _, err := ParseConfigFile([]byte("aggregate_interval: 30s\ntelemetry_compression: off\nspool_max_bytes: 1000000\n"), DefaultConfig()); err != nil {
		t.Fatalf("config file keys: %v", err)
	}
}
