package agent

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/agent/spool"
	"github.com/edgefleet/edgefleet/agent/telemetry"
	"github.com/edgefleet/edgefleet/proto/wire"
)

// Config is the agent's configuration as a user writes it: a YAML file,
// EDGEFLEET_* environment variables and flags, in rising precedence.
//
// The YAML keys are the yaml tags below (read by configfile.go, not by a
// YAML library); an unknown key is an error.
type Config struct {
	// ID is the device id; default: the host name, made valid.
	ID string `yaml:"id"`
	// Data is the data directory (spool, bundles, state).
	Data string `yaml:"data"`
	// Labels describe the device for rollout targeting (region=eu, hw=rpi5).
	Labels map[string]string `yaml:"labels"`
	// Broker is the MQTT broker URL.
	Broker string `yaml:"broker"`
	// Controller is the controller's base URL, for bundle downloads.
	Controller string `yaml:"controller"`
	// Listen is the local inference endpoint's address.
	Listen string `yaml:"listen"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `yaml:"log_level"`
	// SpoolMaxRecords bounds the telemetry spool.
	SpoolMaxRecords uint64 `yaml:"spool_max_records"`
	// SpoolMaxBytes bounds the spool file (0: only the disk bounds it).
	// Full, it drops records by the spool's policy. At most half the
	// filesystem's free space: the WAL beside the file needs the rest.
	SpoolMaxBytes uint64 `yaml:"spool_max_bytes"`
	// AggregateInterval is the length of the inference aggregates (0: one
	// minute); it divides a minute or is a whole number of minutes, so the
	// controller's per-minute rollups are exact.
	AggregateInterval time.Duration `yaml:"aggregate_interval"`
	// TelemetryCompression is auto (zstd while the controller reads it),
	// zstd or off.
	TelemetryCompression string `yaml:"telemetry_compression"`
	// TLSCert and TLSKey are the device's MQTT client certificate and key
	// (`fleet certs device ID`); the broker takes the device id from the
	// certificate. They need an ssl:// (or tls://, mqtts://, wss://) broker.
	TLSCert string `yaml:"tls_cert"`
	TLSKey  string `yaml:"tls_key"`
	// TLSCA is the CA that signed the broker's certificate (the fleet's
	// ca.crt); empty trusts the system's CAs.
	TLSCA string `yaml:"tls_ca"`
	// Health is the health watch of a new version when its rollout's
	// policy leaves fields unset.
	Health HealthConfig `yaml:"health"`
	// Shadow gives every new version a shadow phase before its switch.
	Shadow ShadowConfig `yaml:"shadow"`
	// ReleaseKeys are public key files (PEM, from `fleet keys init`); a
	// bundle's manifest.sig must carry a signature by one of them. More
	// than one is how a release key is rotated.
	ReleaseKeys []string `yaml:"release_keys"`
	// DirectorKeys are the controller's director public key files
	// (DATA/keys/director.pub on the controller); every desired state must
	// be signed by one of them.
	DirectorKeys []string `yaml:"director_keys"`
	// AllowUnsigned lets the agent start without both keys and accepts
	// unsigned bundles and desired states with a warning (development, or
	// a fleet moving to signing). Without it, an agent missing a key
	// refuses to start; with it and no key at all, it checks nothing and
	// says so loudly.
	AllowUnsigned bool `yaml:"allow_unsigned"`
	// UpdateDeadline is how long a new agent release has to connect and
	// report healthy before the watchdog (fleet-agent supervise) restores
	// the previous binary, when the rollout sets none. Zero: 60s.
	UpdateDeadline time.Duration `yaml:"update_deadline"`
	// TrimAfter is how long fleet-agent waits without inferences or
	// deployment changes before it gives memory it does not use back to the
	// system: the heap's free pages and the pages of its binary that only
	// start-up and compiles ran (agent/internal/memtrim). Zero turns that
	// off. Process-wide: only fleet-agent applies it (Options.TrimIdle), not
	// agents embedded in another process.
	TrimAfter time.Duration `yaml:"trim_after"`
	// MemoryLimit is the Go runtime's soft memory limit in bytes
	// (debug.SetMemoryLimit): near it, garbage collection runs more often
	// to stay under it. Zero leaves the runtime's default (GOMEMLIMIT, or
	// no limit). Process-wide: only fleet-agent applies it.
	MemoryLimit uint64 `yaml:"memory_limit"`
}

// Defaults.
const (
	DefaultData       = "./agent-data"
	DefaultBroker     = "tcp://127.0.0.1:1883"
	DefaultController = "http://127.0.0.1:8080"
	DefaultListen     = "127.0.0.1:8181"
	DefaultLogLevel   = "info"
	// DefaultTrimAfter is the default TrimAfter: long enough that an agent
	// serving steady traffic never trims, short enough that one that
	// serves in bursts gives its memory back between them.
	DefaultTrimAfter = 5 * time.Second
	// MinMemoryLimit is the smallest MemoryLimit: below it an idle agent
	// is already over it and collects garbage without pause.
	MinMemoryLimit = 16 << 20
)

// maxConfigFile caps the YAML file; a real one is a few hundred bytes.
const maxConfigFile = 1 << 20

// DefaultConfig returns the configuration with no file, environment or
// flags, except the device id (which LoadConfig derives from the host).
func DefaultConfig() Config {
	return Config{
		Data:            DefaultData,
		Labels:          map[string]string{},
		Broker:          DefaultBroker,
		Controller:      DefaultController,
		Listen:          DefaultListen,
		LogLevel:        DefaultLogLevel,
		SpoolMaxRecords: spool.DefaultMaxRecords,

		AggregateInterval:    telemetry.DefaultInterval,
		TelemetryCompression: "auto",
		TrimAfter:            DefaultTrimAfter,
	}
}

var (
	labelKeyRE   = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$`)
	labelValueRE = regexp.MustCompile(`^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$`)
)

// Validate checks every field. Its errors name the field and the fix.
func (c Config) Validate() error {
	var errs []error
	if err := wire.ValidateDeviceID(c.ID); err != nil {
		errs = append(errs, fmt.Errorf("id: %w; set --id or EDGEFLEET_ID", err))
	}
	if strings.TrimSpace(c.Data) == "" {
		errs = append(errs, errors.New("data: empty; set --data to a writable directory"))
	}
	keys := make([]string, 0, len(c.Labels))
	for k := range c.Labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !labelKeyRE.MatchString(k) {
			errs = append(errs, fmt.Errorf("labels: key %q: use 1-63 letters, digits, '.', '_', '-' or '/', starting and ending with a letter or digit", k))
		}
		if !labelValueRE.MatchString(c.Labels[k]) {
			errs = append(errs, fmt.Errorf("labels: %s=%q: use up to 63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit", k, c.Labels[k]))
		}
	}
	if u, err := url.Parse(c.Broker); err != nil || u.Host == "" || !brokerSchemes[u.Scheme] {
		errs = append(errs, fmt.Errorf("broker: %q is not a broker URL; use tcp://host:1883 (or ssl://, ws://, wss://)", c.Broker))
	} else if u.Port() == "" {
		errs = append(errs, fmt.Errorf("broker: %q has no port; add one, e.g. tcp://%s:1883", c.Broker, u.Host))
	}
	if u, err := url.Parse(c.Controller); err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		errs = append(errs, fmt.Errorf("controller: %q is not an http(s) URL; use e.g. http://127.0.0.1:8080", c.Controller))
	}
	if _, port, err := net.SplitHostPort(c.Listen); err != nil || port == "" {
		errs = append(errs, fmt.Errorf("listen: %q is not host:port; use e.g. 127.0.0.1:8181", c.Listen))
	}
	if _, err := parseLevel(c.LogLevel); err != nil {
		errs = append(errs, fmt.Errorf("log_level: %w", err))
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		errs = append(errs, errors.New("tls_cert and tls_key go together: set both --tls-cert and --tls-key to the device's certificate and key"))
	}
	if u, err := url.Parse(c.Broker); err == nil && (c.TLSCert != "" || c.TLSCA != "") && !tlsSchemes[u.Scheme] {
		errs = append(errs, fmt.Errorf("broker: %q is not encrypted but TLS settings are given; use ssl://%s", c.Broker, u.Host))
	}
	if err := c.Health.validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Shadow.validate(); err != nil {
		errs = append(errs, err)
	}
	for _, k := range []struct {
		name string
		list []string
	}{{"release_keys", c.ReleaseKeys}, {"director_keys", c.DirectorKeys}} {
		for _, f := range k.list {
			if strings.TrimSpace(f) == "" {
				errs = append(errs, fmt.Errorf("%s: an empty file name; list public key files such as release.pub", k.name))
			}
		}
	}
	if c.SpoolMaxBytes != 0 && c.SpoolMaxBytes < spool.MinMaxBytes {
		errs = append(errs, fmt.Errorf("spool_max_bytes: %d is too small; use 0 (no bound but the disk's) or at least %d", c.SpoolMaxBytes, spool.MinMaxBytes))
	}
	if iv := c.AggregateInterval; iv != 0 && (iv < time.Second || iv > time.Hour || (time.Minute%iv != 0 && iv%time.Minute != 0)) {
		errs = append(errs, fmt.Errorf("aggregate_interval: %s; use 1s to 1h, dividing a minute or a whole number of minutes (e.g. 10s, 1m, 5m)", iv))
	}
	if _, err := telemetry.ParseCompression(c.TelemetryCompression); err != nil {
		errs = append(errs, fmt.Errorf("telemetry_compression: %w", err))
	}
	if c.UpdateDeadline < 0 || (c.UpdateDeadline > 0 && c.UpdateDeadline < time.Second) {
		errs = append(errs, fmt.Errorf("update_deadline: %s is too short for a restart; use at least 1s (default 60s)", c.UpdateDeadline))
	}
	if c.TrimAfter < 0 {
		errs = append(errs, fmt.Errorf("trim_after: %s is negative; use 0 (never trim) or a duration such as 5s", c.TrimAfter))
	}
	if c.MemoryLimit != 0 && c.MemoryLimit < MinMemoryLimit {
		errs = append(errs, fmt.Errorf("memory_limit: %d bytes is below what an idle agent uses; use 0 (the Go runtime's default) or at least %d", c.MemoryLimit, MinMemoryLimit))
	}
	if c.SpoolMaxRecords < 100 {
		errs = append(errs, fmt.Errorf("spool_max_records: %d is too small; use at least 100 (default %d)", c.SpoolMaxRecords, spool.DefaultMaxRecords))
	}
	return errors.Join(errs...)
}

var brokerSchemes = map[string]bool{"tcp": true, "mqtt": true, "ssl": true, "tls": true, "mqtts": true, "ws": true, "wss": true}

// tlsSchemes are the broker URL schemes that are encrypted.
var tlsSchemes = map[string]bool{"ssl": true, "tls": true, "mqtts": true, "wss": true}

// SlogLevel returns the configured log level (info when invalid).
func (c Config) SlogLevel() slog.Level {
	l, _ := parseLevel(c.LogLevel)
	return l
}

func parseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "info", "":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return slog.LevelInfo, fmt.Errorf("%q is not a level; use debug, info, warn or error", s)
}

// ParseConfigFile decodes a YAML config file's content over base (the
// subset of YAML configfile.go reads). Unknown keys are errors that name
// the key and the line.
func ParseConfigFile(data []byte, base Config) (Config, error) {
	if len(data) > maxConfigFile {
		return base, fmt.Errorf("%d bytes, over the %d byte cap", len(data), maxConfigFile)
	}
	cfg := base
	fileLabels := map[string]string{}
	cfg.Labels = nil
	if err := decodeConfigFile(data, &cfg); err != nil {
		return base, fmt.Errorf("%w (known keys: %s)", err, strings.Join(configKeys(), ", "))
	}
	for k, v := range base.Labels {
		fileLabels[k] = v
	}
	for k, v := range cfg.Labels {
		fileLabels[k] = v
	}
	cfg.Labels = fileLabels
	return cfg, nil
}

func configKeys() []string {
	return []string{"id", "data", "labels", "broker", "controller", "listen", "log_level", "spool_max_records", "spool_max_bytes", "aggregate_interval", "telemetry_compression", "tls_cert", "tls_key", "tls_ca", "health", "shadow", "release_keys", "director_keys", "allow_unsigned", "update_deadline", "trim_after", "memory_limit"}
}

// listFlag collects a repeated flag's values.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	*l = append(*l, s)
	return nil
}

// labelFlag collects repeated --label k=v.
type labelFlag map[string]string

func (l labelFlag) String() string {
	var parts []string
	for k, v := range l {
		parts = append(parts, k+"="+v)
	}
	sort.Strings(parts)
	return strings.Join(parts, ",")
}

func (l labelFlag) Set(s string) error {
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || k == "" {
			return fmt.Errorf("label %q: want key=value", kv)
		}
		l[k] = v
	}
	return nil
}

// LoadConfig builds the configuration from command-line args, the
// environment (getenv, EDGEFLEET_* names) and the YAML file named by
// --config or EDGEFLEET_CONFIG. Flags win over the environment, which wins
// over the file, which wins over the defaults; labels merge per key. It
// returns flag.ErrHelp for -h. The result is validated.
func LoadConfig(args []string, getenv func(string) string, usage io.Writer) (Config, error) {
	fs := flag.NewFlagSet("fleet-agent", flag.ContinueOnError)
	fs.SetOutput(usage)
	def := DefaultConfig()
	var (
		configFile  = fs.String("config", "", "YAML configuration `file` (env EDGEFLEET_CONFIG)")
		data        = fs.String("data", def.Data, "data `dir`ectory: spool, bundles, state (env EDGEFLEET_DATA)")
		id          = fs.String("id", "", "device `id` (env EDGEFLEET_ID; default: derived from the host name)")
		broker      = fs.String("broker", def.Broker, "MQTT broker `URL` (env EDGEFLEET_BROKER)")
		controller  = fs.String("controller", def.Controller, "controller `URL` for bundle downloads (env EDGEFLEET_CONTROLLER)")
		listen      = fs.String("listen", def.Listen, "local inference endpoint `address` (env EDGEFLEET_LISTEN)")
		logLevel    = fs.String("log-level", def.LogLevel, "debug, info, warn or error (env EDGEFLEET_LOG_LEVEL)")
		spoolMax    = fs.Uint64("spool-max-records", def.SpoolMaxRecords, "bound of the telemetry spool (env EDGEFLEET_SPOOL_MAX_RECORDS)")
		spoolBytes  = fs.Uint64("spool-max-bytes", 0, "bound of the spool file in `bytes`; 0: only the disk (env EDGEFLEET_SPOOL_MAX_BYTES)")
		aggEvery    = fs.Duration("aggregate-interval", def.AggregateInterval, "length of the inference aggregates sent to the controller (env EDGEFLEET_AGGREGATE_INTERVAL)")
		compress    = fs.String("telemetry-compression", def.TelemetryCompression, "auto (zstd while the controller reads it), zstd or off (env EDGEFLEET_TELEMETRY_COMPRESSION)")
		tlsCert     = fs.String("tls-cert", "", "device certificate `file` for an ssl:// broker (env EDGEFLEET_TLS_CERT)")
		tlsKey      = fs.String("tls-key", "", "device key `file` (env EDGEFLEET_TLS_KEY)")
		tlsCA       = fs.String("tls-ca", "", "CA `file` of the broker's certificate, the fleet's ca.crt (env EDGEFLEET_TLS_CA)")
		shadow      = fs.Bool("shadow", false, "give every new version a shadow phase before its switch (env EDGEFLEET_SHADOW=1; tune it under shadow: in the config file)")
		labels      = labelFlag{}
		unsigned    = fs.Bool("allow-unsigned", false, "DEVELOPMENT ONLY: start without --release-key/--director-key and accept unsigned bundles and desired states, with a warning (env EDGEFLEET_ALLOW_UNSIGNED=1)")
		updDeadline = fs.Duration("update-deadline", 0, "how long a new agent release has to connect and report before the watchdog restores the previous binary (default 60s; env EDGEFLEET_UPDATE_DEADLINE)")
		trimAfter   = fs.Duration("trim-after", def.TrimAfter, "give unused memory back to the system after this long without inferences or deployment changes; 0: never (env EDGEFLEET_TRIM_AFTER)")
		memLimit    = fs.Uint64("memory-limit", 0, "the Go runtime's soft memory limit in `bytes`; 0: the runtime's default, GOMEMLIMIT or none (env EDGEFLEET_MEMORY_LIMIT)")
		releaseKs   listFlag
		directorKs  listFlag
	)
	fs.Var(labels, "label", "device label `key=value`, repeatable (env EDGEFLEET_LABELS=k=v,k2=v2)")
	fs.Var(&releaseKs, "release-key", "release public key `file` bundles must be signed with, repeatable (env EDGEFLEET_RELEASE_KEYS=a.pub,b.pub)")
	fs.Var(&directorKs, "director-key", "controller's director public key `file` (its DATA/keys/director.pub), repeatable (env EDGEFLEET_DIRECTOR_KEYS)")
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected argument %q; fleet-agent takes only flags (see -h)", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })

	cfg := def
	path := getenv("EDGEFLEET_CONFIG")
	if set["config"] {
		path = *configFile
	}
	if path != "" {
		raw, err := readCapped(path)
		if err != nil {
			return Config{}, fmt.Errorf("config file: %w", err)
		}
		if cfg, err = ParseConfigFile(raw, cfg); err != nil {
			return Config{}, fmt.Errorf("config file %s: %w", path, err)
		}
	}

	strs := []struct {
		flag, env string
		dst       *string
		val       *string
	}{
		{"data", "EDGEFLEET_DATA", &cfg.Data, data},
		{"id", "EDGEFLEET_ID", &cfg.ID, id},
		{"broker", "EDGEFLEET_BROKER", &cfg.Broker, broker},
		{"controller", "EDGEFLEET_CONTROLLER", &cfg.Controller, controller},
		{"listen", "EDGEFLEET_LISTEN", &cfg.Listen, listen},
		{"log-level", "EDGEFLEET_LOG_LEVEL", &cfg.LogLevel, logLevel},
		{"tls-cert", "EDGEFLEET_TLS_CERT", &cfg.TLSCert, tlsCert},
		{"tls-key", "EDGEFLEET_TLS_KEY", &cfg.TLSKey, tlsKey},
		{"tls-ca", "EDGEFLEET_TLS_CA", &cfg.TLSCA, tlsCA},
		{"telemetry-compression", "EDGEFLEET_TELEMETRY_COMPRESSION", &cfg.TelemetryCompression, compress},
	}
	for _, s := range strs {
		if v := getenv(s.env); v != "" {
			*s.dst = v
		}
		if set[s.flag] {
			*s.dst = *s.val
		}
	}
	if v := getenv("EDGEFLEET_SPOOL_MAX_RECORDS"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return Config{}, fmt.Errorf("EDGEFLEET_SPOOL_MAX_RECORDS=%q is not a number", v)
		}
		cfg.SpoolMaxRecords = n
	}
	if set["spool-max-records"] {
		cfg.SpoolMaxRecords = *spoolMax
	}
	if v := getenv("EDGEFLEET_SPOOL_MAX_BYTES"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return Config{}, fmt.Errorf("EDGEFLEET_SPOOL_MAX_BYTES=%q is not a number of bytes", v)
		}
		cfg.SpoolMaxBytes = n
	}
	if set["spool-max-bytes"] {
		cfg.SpoolMaxBytes = *spoolBytes
	}
	if v := getenv("EDGEFLEET_AGGREGATE_INTERVAL"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return Config{}, fmt.Errorf("EDGEFLEET_AGGREGATE_INTERVAL=%q is not a duration; use e.g. 1m", v)
		}
		cfg.AggregateInterval = d
	}
	if set["aggregate-interval"] {
		cfg.AggregateInterval = *aggEvery
	}
	if v := getenv("EDGEFLEET_SHADOW"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return Config{}, fmt.Errorf("EDGEFLEET_SHADOW=%q: use 1 or 0", v)
		}
		cfg.Shadow.Enabled = b
	}
	if set["shadow"] {
		cfg.Shadow.Enabled = *shadow
	}
	if v := getenv("EDGEFLEET_ALLOW_UNSIGNED"); v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return Config{}, fmt.Errorf("EDGEFLEET_ALLOW_UNSIGNED=%q: use 1 or 0", v)
		}
		cfg.AllowUnsigned = b
	}
	if set["allow-unsigned"] {
		cfg.AllowUnsigned = *unsigned
	}
	if v := getenv("EDGEFLEET_UPDATE_DEADLINE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return Config{}, fmt.Errorf("EDGEFLEET_UPDATE_DEADLINE=%q: use a duration such as 60s", v)
		}
		cfg.UpdateDeadline = d
	}
	if set["update-deadline"] {
		cfg.UpdateDeadline = *updDeadline
	}
	if v := getenv("EDGEFLEET_TRIM_AFTER"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return Config{}, fmt.Errorf("EDGEFLEET_TRIM_AFTER=%q: use a duration such as 5s, or 0", v)
		}
		cfg.TrimAfter = d
	}
	if set["trim-after"] {
		cfg.TrimAfter = *trimAfter
	}
	if v := getenv("EDGEFLEET_MEMORY_LIMIT"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return Config{}, fmt.Errorf("EDGEFLEET_MEMORY_LIMIT=%q is not a number of bytes", v)
		}
		cfg.MemoryLimit = n
	}
	if set["memory-limit"] {
		cfg.MemoryLimit = *memLimit
	}
	// Key lists are replaced, not merged: a flag names the whole set.
	for _, k := range []struct {
		flag, env string
		dst       *[]string
		val       listFlag
	}{
		{"release-key", "EDGEFLEET_RELEASE_KEYS", &cfg.ReleaseKeys, releaseKs},
		{"director-key", "EDGEFLEET_DIRECTOR_KEYS", &cfg.DirectorKeys, directorKs},
	} {
		if v := getenv(k.env); v != "" {
			*k.dst = strings.Split(v, ",")
		}
		if set[k.flag] {
			*k.dst = k.val
		}
	}
	merged := map[string]string{}
	for k, v := range cfg.Labels {
		merged[k] = v
	}
	if v := getenv("EDGEFLEET_LABELS"); v != "" {
		env := labelFlag{}
		if err := env.Set(v); err != nil {
			return Config{}, fmt.Errorf("EDGEFLEET_LABELS: %w", err)
		}
		for k, v := range env {
			merged[k] = v
		}
	}
	for k, v := range labels {
		merged[k] = v
	}
	cfg.Labels = merged
	if cfg.ID == "" {
		host, _ := os.Hostname()
		cfg.ID = DeviceIDFromHostname(host)
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

func readCapped(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, maxConfigFile+1))
}

// DeviceIDFromHostname turns a host name into a valid device id: every
// character wire.ValidateDeviceID does not allow becomes '-', leading dots
// go, and the result is cut to the length limit. An empty result is
// "agent".
func DeviceIDFromHostname(h string) string {
	b := []byte(strings.TrimLeft(h, "."))
	for i, c := range b {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.'
		if !ok {
			b[i] = '-'
		}
	}
	if len(b) > wire.MaxDeviceID {
		b = b[:wire.MaxDeviceID]
	}
	if len(b) == 0 {
		return "agent"
	}
	return string(b)
}
