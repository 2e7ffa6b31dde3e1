package agent

import (
	"bytes"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func writeFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "agent.yaml")
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigPrecedence(t *testing.T) {
	file := writeFile(t, `
id: from-file
data: /file/data
broker: tcp://file:1883
controller: http://file:8080
listen: 127.0.0.1:9001
log_level: warn
spool_max_records: 5000
labels:
  region: eu
  hw: rpi5
  site: a
`)
	var usage bytes.Buffer
	cfg, err := LoadConfig(
		[]string{"--config", file, "--broker", "tcp://flag:1883", "--label", "hw=jetson", "--label", "lane=3,zone=b"},
		env(map[string]string{
			"EDGEFLEET_BROKER":     "tcp://env:1883",
			"EDGEFLEET_LISTEN":     "127.0.0.1:9002",
			"EDGEFLEET_LABELS":     "site=b,hw=env",
			"EDGEFLEET_LOG_LEVEL":  "debug",
			"EDGEFLEET_CONFIG":     "/does/not/matter",
			"EDGEFLEET_CONTROLLER": "",
		}), &usage)
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct{ name, got, want string }{
		{"id from file", cfg.ID, "from-file"},
		{"data from file", cfg.Data, "/file/data"},
		{"broker: flag beats env and file", cfg.Broker, "tcp://flag:1883"},
		{"listen: env beats file", cfg.Listen, "127.0.0.1:9002"},
		{"controller: empty env leaves the file's", cfg.Controller, "http://file:8080"},
		{"log level from env", cfg.LogLevel, "debug"},
		{"label from file only", cfg.Labels["region"], "eu"},
		{"label: env beats file", cfg.Labels["site"], "b"},
		{"label: flag beats env and file", cfg.Labels["hw"], "jetson"},
		{"comma-separated flag labels", cfg.Labels["lane"] + cfg.Labels["zone"], "3b"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %q, want %q", c.name, c.got, c.want)
		}
	}
	if cfg.SpoolMaxRecords != 5000 {
		t.Errorf("spool max %d", cfg.SpoolMaxRecords)
	}
}

func TestConfigDefaults(t *testing.T) {
	cfg, err := LoadConfig(nil, env(nil), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	want := DefaultConfig()
	if cfg.Data != want.Data || cfg.Broker != DefaultBroker || cfg.Controller != DefaultController || cfg.Listen != DefaultListen ||
		cfg.SpoolMaxRecords != 1_000_000 || cfg.ID != DeviceIDFromHostname(host) || len(cfg.Labels) != 0 {
		t.Fatalf("defaults %+v", cfg)
	}
	// Environment alone, and EDGEFLEET_CONFIG naming the file.
	file := writeFile(t, "labels: {region: us}\n")
	cfg, err = LoadConfig(nil, env(map[string]string{"EDGEFLEET_CONFIG": file, "EDGEFLEET_ID": "env-id", "EDGEFLEET_SPOOL_MAX_RECORDS": "777"}), &bytes.Buffer{})
	if err != nil || cfg.ID != "env-id" || cfg.Labels["region"] != "us" || cfg.SpoolMaxRecords != 777 {
		t.Fatalf("%+v %v", cfg, err)
	}
}

func TestConfigErrors(t *testing.T) {
	cases := []struct {
		name string
		args []string
		file string
		env  map[string]string
		want []string
	}{
		{"unknown yaml key", nil, "id: a\nbrokr: tcp://x:1\n", nil, []string{"brokr", "known keys"}},
		{"yaml type", nil, "spool_max_records: lots\n", nil, []string{"lots"}},
		{"bad id", []string{"--id", "a/b"}, "", nil, []string{"id:", "--id"}},
		{"bad broker", []string{"--broker", "http://x"}, "", nil, []string{"broker:", "tcp://"}},
		{"broker without port", []string{"--broker", "tcp://x"}, "", nil, []string{"no port"}},
		{"bad controller", []string{"--controller", "ftp://x"}, "", nil, []string{"controller:"}},
		{"bad listen", []string{"--listen", "8181"}, "", nil, []string{"listen:", "127.0.0.1:8181"}},
		{"bad level", []string{"--log-level", "loud"}, "", nil, []string{"log_level:", "debug, info"}},
		{"bad label flag", []string{"--label", "novalue"}, "", nil, []string{"key=value"}},
		{"bad label key", []string{"--label", "a b=c"}, "", nil, []string{"labels: key \"a b\""}},
		{"bad label value", []string{"--label", "a=b c"}, "", nil, []string{"labels: a=\"b c\""}},
		{"tiny spool", []string{"--spool-max-records", "5"}, "", nil, []string{"spool_max_records"}},
		{"bad env number", nil, "", map[string]string{"EDGEFLEET_SPOOL_MAX_RECORDS": "x"}, []string{"EDGEFLEET_SPOOL_MAX_RECORDS"}},
		{"missing file", []string{"--config", "/nonexistent/agent.yaml"}, "", nil, []string{"/nonexistent/agent.yaml"}},
		{"stray argument", []string{"run"}, "", nil, []string{`unexpected argument "run"`}},
		{"negative trim", []string{"--trim-after", "-1s"}, "", nil, []string{"trim_after", "0 (never trim)"}},
		{"bad trim env", nil, "", map[string]string{"EDGEFLEET_TRIM_AFTER": "soon"}, []string{"EDGEFLEET_TRIM_AFTER"}},
		{"tiny memory limit", []string{"--memory-limit", "1000"}, "", nil, []string{"memory_limit", "at least"}},
		{"bad memory limit env", nil, "", map[string]string{"EDGEFLEET_MEMORY_LIMIT": "64MiB"}, []string{"EDGEFLEET_MEMORY_LIMIT", "bytes"}},
		{"two errors at once", []string{"--id", "", "--broker", "x", "--listen", "y"}, "", map[string]string{"EDGEFLEET_ID": "a b"}, []string{"broker:", "listen:"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			args := c.args
			if c.file != "" {
				args = append([]string{"--config", writeFile(t, c.file)}, args...)
			}
			_, err := LoadConfig(args, env(c.env), &bytes.Buffer{})
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
	if _, err := LoadConfig([]string{"-h"}, env(nil), &bytes.Buffer{}); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
}

// The memory settings come from the file, the environment and flags in
// the usual order, and default to trimming after DefaultTrimAfter with
// the runtime's own memory limit.
func TestConfigMemory(t *testing.T) {
	cfg, err := LoadConfig(nil, env(nil), &bytes.Buffer{})
	if err != nil || cfg.TrimAfter != DefaultTrimAfter || cfg.MemoryLimit != 0 {
		t.Fatalf("defaults: trim_after %s, memory_limit %d, %v", cfg.TrimAfter, cfg.MemoryLimit, err)
	}
	file := writeFile(t, "trim_after: 30s\nmemory_limit: 33554432\n")
	cases := []struct {
		name  string
		args  []string
		env   map[string]string
		trim  time.Duration
		limit uint64
	}{
		{"file", []string{"--config", file}, nil, 30 * time.Second, 32 << 20},
		{"env beats file", []string{"--config", file}, map[string]string{"EDGEFLEET_TRIM_AFTER": "0", "EDGEFLEET_MEMORY_LIMIT": "67108864"}, 0, 64 << 20},
		{"flag beats env", []string{"--config", file, "--trim-after", "1m", "--memory-limit", "0"}, map[string]string{"EDGEFLEET_TRIM_AFTER": "0"}, time.Minute, 0},
	}
	for _, c := range cases {
		cfg, err := LoadConfig(c.args, env(c.env), &bytes.Buffer{})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if cfg.TrimAfter != c.trim || cfg.MemoryLimit != c.limit {
			t.Errorf("%s: trim_after %s, memory_limit %d; want %s, %d", c.name, cfg.TrimAfter, cfg.MemoryLimit, c.trim, c.limit)
		}
	}
}

func TestDeviceIDFromHostname(t *testing.T) {
	cases := map[string]string{
		"pos-17":                 "pos-17",
		"..hidden":               "hidden",
		"my host.local":          "my-host.local",
		"":                       "agent",
		"ünï":                    "--n--",
		strings.Repeat("a", 200): strings.Repeat("a", 128),
	}
	for in, want := range cases {
		got := DeviceIDFromHostname(in)
		if got != want {
			t.Errorf("DeviceIDFromHostname(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzParseConfigFile(f *testing.F) {
	f.Add([]byte("id: a\nlabels: {region: eu}\nspool_max_records: 100\n"))
	f.Add([]byte("nope: 1\n"))
	f.Add([]byte("labels: [1, 2]\n"))
	f.Add([]byte("health: {watch: 90s, max_error_rate: 0.02, max_latency_p99: 250ms, min_inferences: 50}\nshadow: {enabled: true, min_agreement: 0.99}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := ParseConfigFile(data, DefaultConfig())
		if err != nil {
			return
		}
		if cfg.Labels == nil {
			t.Fatal("nil labels")
		}
		_ = cfg.Validate()
		if _, err := ParseConfigFile(data, cfg); err != nil {
			t.Fatalf("second parse of an accepted file failed: %v", err)
		}
	})
}
