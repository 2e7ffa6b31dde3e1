package controller

import (
	"flag"
	"io"
	"strings"
	"testing"
	"time"
)

func TestConfigPrecedence(t *testing.T) {
	env := map[string]string{
		"EDGEFLEET_DATA":        "/env/data",
		"EDGEFLEET_HTTP_LISTEN": "0.0.0.0:9000",
		"EDGEFLEET_PUBLIC_URL":  "http://fleet:9000/",
	}
	cfg := DefaultConfig()
	cfg.ApplyEnv(func(k string) string { return env[k] })
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg.RegisterFlags(fs)
	if err := fs.Parse([]string{"--data", "/flag/data", "--log-level", "debug"}); err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	want := Config{DataDir: "/flag/data", MQTTListen: "127.0.0.1:1883", HTTPListen: "0.0.0.0:9000", PublicURL: "http://fleet:9000", LogLevel: "debug",
		TelemetryRetention: "7d", TelemetryRawRetention: "2d", retention: 7 * 24 * time.Hour, rawRetention: 48 * time.Hour,
		DesiredRenewBefore: "7d", renewBefore: 7 * 24 * time.Hour}
	if cfg != want {
		t.Fatalf("config = %+v, want %+v", cfg, want)
	}
}

func TestConfigValidate(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"defaults", func(*Config) {}, ""},
		{"external broker ignores mqtt-listen", func(c *Config) { c.Broker = "tcp://b:1883"; c.MQTTListen = "" }, ""},
		{"no data", func(c *Config) { c.DataDir = "" }, "--data is empty"},
		{"bad http", func(c *Config) { c.HTTPListen = "8080" }, "--http-listen"},
		{"bad mqtt", func(c *Config) { c.MQTTListen = "localhost" }, "--mqtt-listen"},
		{"bad broker", func(c *Config) { c.Broker = "b:1883" }, "--broker"},
		{"bad public url", func(c *Config) { c.PublicURL = "fleet:9000" }, "--public-url"},
		{"bad level", func(c *Config) { c.LogLevel = "loud" }, "--log-level"},
		{"two errors", func(c *Config) { c.DataDir = ""; c.LogLevel = "loud" }, "--data is empty"},
		{"embedded broker with TLS", func(c *Config) { c.MQTTTLSCert, c.MQTTTLSKey, c.MQTTClientCA = "c", "k", "ca" }, ""},
		{"embedded broker without its CA", func(c *Config) { c.MQTTTLSCert, c.MQTTTLSKey = "c", "k" }, "--mqtt-client-ca go together"},
		{"external TLS broker", func(c *Config) {
			c.Broker = "ssl://b:8883"
			c.MQTTTLSCert, c.MQTTTLSKey, c.MQTTClientCA = "c", "k", "ca"
		}, ""},
		{"external TLS broker, server auth only", func(c *Config) { c.Broker = "ssl://b:8883"; c.MQTTClientCA = "ca" }, ""},
		{"TLS flags with a plain broker", func(c *Config) { c.Broker = "tcp://b:1883"; c.MQTTClientCA = "ca" }, "need an encrypted URL such as ssl://b:1883"},
		{"client cert without key", func(c *Config) { c.Broker = "ssl://b:8883"; c.MQTTTLSCert = "c" }, "go together"},
		{"retention in hours", func(c *Config) { c.TelemetryRetention = "36h"; c.TelemetryRawRetention = "0" }, ""},
		{"no retention", func(c *Config) { c.TelemetryRetention = "0" }, "--telemetry-retention"},
		{"bad raw retention", func(c *Config) { c.TelemetryRawRetention = "a week" }, "--telemetry-raw-retention"},
		{"renewal in hours", func(c *Config) { c.DesiredRenewBefore = "36h" }, ""},
		{"renewal as long as the expiry", func(c *Config) { c.DesiredRenewBefore = "30d" }, "shorter than the 30-day expiry"},
		{"no renewal horizon", func(c *Config) { c.DesiredRenewBefore = "0" }, "--desired-renew-before"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg := DefaultConfig()
			c.mutate(&cfg)
			err := cfg.Validate()
			if c.want == "" {
				if err != nil {
					t.Fatalf("Validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Validate = %v, want %q", err, c.want)
			}
		})
	}
}
