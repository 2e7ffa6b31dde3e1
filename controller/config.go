package controller

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/controller/director"
	"github.com/edgefleet/edgefleet/controller/rollout"
)

// Config is the controller's configuration: flags, EDGEFLEET_* environment
// variables and defaults, in that order of precedence.
type Config struct {
	// DataDir holds controller.db and artifacts/ (--data, EDGEFLEET_DATA).
	DataDir string
	// MQTTListen is the embedded broker's address (--mqtt-listen,
	// EDGEFLEET_MQTT_LISTEN). Ignored when Broker is set.
	MQTTListen string
	// Broker, if set, is an external broker's URL, e.g.
	// tcp://10.0.0.5:1883; no broker is embedded then (--broker,
	// EDGEFLEET_BROKER).
	Broker string
	// HTTPListen is the API's address (--http-listen, EDGEFLEET_HTTP_LISTEN).
	HTTPListen string
	// PublicURL is the base URL agents download artifacts from
	// (--public-url, EDGEFLEET_PUBLIC_URL). Empty: desired states carry
	// artifact paths (/v1/artifacts/<digest>) that each agent resolves
	// against its own --controller URL, which is right whenever agents
	// reach the controller directly.
	PublicURL string
	// LogLevel is debug, info, warn or error (--log-level,
	// EDGEFLEET_LOG_LEVEL).
	LogLevel string

	// MQTTTLSCert and MQTTTLSKey are the controller's MQTT certificate
	// and key (--mqtt-tls-cert, --mqtt-tls-key). With the embedded broker
	// they are its server certificate; with an external ssl:// broker, the
	// controller's client certificate (CN edgefleet-controller).
	MQTTTLSCert, MQTTTLSKey string
	// MQTTClientCA is the fleet CA (--mqtt-client-ca). With the embedded
	// broker it must have signed every client's certificate; with an
	// external broker it verifies the broker's certificate.
	MQTTClientCA string

	// TelemetryRetention is how long inference aggregates (per device per
	// minute) are kept (--telemetry-retention, e.g. 7d or 36h).
	TelemetryRetention string
	// TelemetryRawRetention is how long raw telemetry batches are kept
	// (--telemetry-raw-retention); 0 keeps none, only their aggregates and
	// the seqs that dedupe them.
	TelemetryRawRetention string
	// retention and rawRetention are the two, parsed by Validate.
	retention, rawRetention time.Duration
	// DesiredRenewBefore is how long before its expiry a device's desired
	// state is re-issued (--desired-renew-before, e.g. 7d; it must be
	// shorter than the 30-day expiry); renewBefore is it parsed.
	DesiredRenewBefore string
	renewBefore        time.Duration

	// Tests shorten the MQTT link's waits; zero means the link's defaults.
	publishTimeout, connectTimeout time.Duration
	// rolloutTuning, when set, gives the rollout engine's timings and
	// extra gates (tests shorten them). A pointer keeps Config comparable.
	rolloutTuning *rollout.Options
}

// DefaultConfig returns the configuration of a controller started with no
// flags: one machine, one working fleet.
func DefaultConfig() Config {
	return Config{
		DataDir:    "./data",
		MQTTListen: "127.0.0.1:1883",
		HTTPListen: "127.0.0.1:8080",
		LogLevel:   "info",

		TelemetryRetention:    "7d",
		TelemetryRawRetention: "2d",
		DesiredRenewBefore:    "7d",
	}
}

// ApplyEnv overrides fields from EDGEFLEET_* variables that are set.
func (c *Config) ApplyEnv(getenv func(string) string) {
	for name, dst := range c.fields() {
		if v := getenv("EDGEFLEET_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))); v != "" {
			*dst = v
		}
	}
}

// RegisterFlags defines the controller's flags on fs, defaulting to c's
// current values (so call ApplyEnv first and the flags win).
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.DataDir, "data", c.DataDir, "directory for the database and artifacts")
	fs.StringVar(&c.MQTTListen, "mqtt-listen", c.MQTTListen, "address of the embedded MQTT broker")
	fs.StringVar(&c.Broker, "broker", c.Broker, "URL of an external MQTT broker (e.g. tcp://127.0.0.1:1883); no broker is embedded then")
	fs.StringVar(&c.HTTPListen, "http-listen", c.HTTPListen, "address of the HTTP API")
	fs.StringVar(&c.PublicURL, "public-url", c.PublicURL, "base URL agents download artifacts from (default: agents use their own --controller URL)")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "log level: debug, info, warn or error")
	fs.StringVar(&c.MQTTTLSCert, "mqtt-tls-cert", c.MQTTTLSCert, "MQTT TLS certificate: the embedded broker's (devices must then present certificates), or the controller's client certificate for an ssl:// --broker")
	fs.StringVar(&c.MQTTTLSKey, "mqtt-tls-key", c.MQTTTLSKey, "key of --mqtt-tls-cert")
	fs.StringVar(&c.TelemetryRetention, "telemetry-retention", c.TelemetryRetention, "how long inference aggregates (per device per minute) are kept, e.g. 7d or 36h")
	fs.StringVar(&c.TelemetryRawRetention, "telemetry-raw-retention", c.TelemetryRawRetention, "how long raw telemetry batches are kept, e.g. 2d; 0 keeps none")
	fs.StringVar(&c.DesiredRenewBefore, "desired-renew-before", c.DesiredRenewBefore, "re-issue a device's desired state this long before its 30-day expiry, e.g. 7d")
	fs.StringVar(&c.MQTTClientCA, "mqtt-client-ca", c.MQTTClientCA, "fleet CA: signs every MQTT client's certificate (embedded broker), or the ssl:// --broker's certificate")
}

func (c *Config) fields() map[string]*string {
	return map[string]*string{
		"data":        &c.DataDir,
		"mqtt-listen": &c.MQTTListen,
		"broker":      &c.Broker,
		"http-listen": &c.HTTPListen,
		"public-url":  &c.PublicURL,
		"log-level":   &c.LogLevel,

		"mqtt-tls-cert":  &c.MQTTTLSCert,
		"mqtt-tls-key":   &c.MQTTTLSKey,
		"mqtt-client-ca": &c.MQTTClientCA,

		"telemetry-retention":     &c.TelemetryRetention,
		"desired-renew-before":    &c.DesiredRenewBefore,
		"telemetry-raw-retention": &c.TelemetryRawRetention,
	}
}

// Validate checks the configuration and normalises PublicURL (no trailing
// slash). Each error names the flag and what to write instead.
func (c *Config) Validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("--data is empty; give the directory for the controller's database"))
	}
	if err := checkAddr(c.HTTPListen); err != nil {
		errs = append(errs, fmt.Errorf("--http-listen: %w", err))
	}
	if c.Broker == "" {
		if err := checkAddr(c.MQTTListen); err != nil {
			errs = append(errs, fmt.Errorf("--mqtt-listen: %w", err))
		}
		if c.MQTTTLS() && (c.MQTTTLSCert == "" || c.MQTTTLSKey == "" || c.MQTTClientCA == "") {
			errs = append(errs, errors.New("--mqtt-tls-cert, --mqtt-tls-key and --mqtt-client-ca go together: the embedded broker needs its certificate, its key and the fleet CA that signs device certificates (`fleet certs init` makes all three)"))
		}
	} else if u, err := url.Parse(c.Broker); err != nil || u.Host == "" || u.Scheme == "" {
		errs = append(errs, fmt.Errorf("--broker %q: want a URL such as tcp://127.0.0.1:1883", c.Broker))
	} else if c.MQTTTLS() && !tlsSchemes[u.Scheme] {
		errs = append(errs, fmt.Errorf("--broker %q: the --mqtt-tls-* flags need an encrypted URL such as ssl://%s", c.Broker, u.Host))
	} else if (c.MQTTTLSCert == "") != (c.MQTTTLSKey == "") {
		errs = append(errs, errors.New("--mqtt-tls-cert and --mqtt-tls-key go together: give the controller's client certificate and its key"))
	}
	if c.PublicURL != "" {
		u, err := url.Parse(c.PublicURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
			errs = append(errs, fmt.Errorf("--public-url %q: want an http(s) URL such as http://controller.example:8080", c.PublicURL))
		}
		c.PublicURL = strings.TrimRight(c.PublicURL, "/")
	}
	if _, err := c.Level(); err != nil {
		errs = append(errs, err)
	}
	var err error
	if c.retention, err = parseRetention(c.TelemetryRetention, "7d"); err != nil || c.retention <= 0 {
		errs = append(errs, fmt.Errorf("--telemetry-retention %q: give a positive duration such as 7d or 36h", c.TelemetryRetention))
	}
	if c.rawRetention, err = parseRetention(c.TelemetryRawRetention, "2d"); err != nil || c.rawRetention < 0 {
		errs = append(errs, fmt.Errorf("--telemetry-raw-retention %q: give a duration such as 2d or 12h, or 0 to keep no raw batches", c.TelemetryRawRetention))
	}
	if c.renewBefore, err = parseRetention(c.DesiredRenewBefore, "7d"); err != nil || c.renewBefore <= 0 || c.renewBefore >= director.DefaultExpiry {
		errs = append(errs, fmt.Errorf("--desired-renew-before %q: give a positive duration shorter than the %d-day expiry of desired states, such as 7d", c.DesiredRenewBefore, int(director.DefaultExpiry/(24*time.Hour))))
	}
	return errors.Join(errs...)
}

// tlsSchemes are the broker URL schemes paho encrypts.
var tlsSchemes = map[string]bool{"ssl": true, "tls": true, "mqtts": true, "wss": true}

// MQTTTLS reports whether any MQTT TLS setting is given.
func (c *Config) MQTTTLS() bool {
	return c.MQTTTLSCert != "" || c.MQTTTLSKey != "" || c.MQTTClientCA != ""
}

// Level returns the slog level named by LogLevel.
func (c *Config) Level() (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(c.LogLevel)); err != nil {
		return 0, fmt.Errorf("--log-level %q: use debug, info, warn or error", c.LogLevel)
	}
	return l, nil
}

func checkAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port (e.g. 127.0.0.1:8080): %w", addr, err)
	}
	if port == "" {
		return fmt.Errorf("%q has no port", addr)
	}
	return nil
}

// parseRetention reads a Go duration or a number of days ("7d"); empty
// takes def.
func parseRetention(s, def string) (time.Duration, error) {
	if s == "" {
		s = def
	}
	if d, ok := strings.CutSuffix(s, "d"); ok {
		n, err := strconv.ParseFloat(d, 64)
		if err != nil {
			return 0, err
		}
		return time.Duration(n * float64(24*time.Hour)), nil
	}
	return time.ParseDuration(s)
}
