package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/edgefleet/edgefleet/fleet/client"
	"github.com/edgefleet/edgefleet/scripts/internal/proc"
)

// Device ids of the TLS tests: a and b run as real agents; c is a device
// with a valid certificate and no agent, used to probe the broker's ACL.
const (
	tlsDevA = "tls-a"
	tlsDevB = "tls-b"
	tlsDevC = "tls-c"
)

// fleetTool runs the real fleet binary and fails the test on an error.
func fleetTool(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, "fleet"), args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("fleet %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// makeCerts creates the fleet's CA and certificates with `fleet certs`, as
// an operator would, and returns their directory.
func makeCerts(t *testing.T) string {
	t.Helper()
	buildBinaries(t)
	dir := filepath.Join(t.TempDir(), "certs")
	fleetTool(t, "certs", "init", "--dir", dir)
	fleetTool(t, "certs", "broker", "--dir", dir, "--host", "127.0.0.1")
	for _, id := range []string{tlsDevA, tlsDevB, tlsDevC} {
		fleetTool(t, "certs", "device", id, "--dir", dir)
	}
	return dir
}

// agentTLS returns the agent flags that give device id its certificate.
func agentTLS(certs string) func(id string) []string {
	return func(id string) []string {
		return []string{
			"--tls-cert", filepath.Join(certs, "devices", id+".crt"),
			"--tls-key", filepath.Join(certs, "devices", id+".key"),
			"--tls-ca", filepath.Join(certs, "ca.crt"),
		}
	}
}

// clientTLS loads a client's TLS settings: the certificate named (a path
// under certs without extension, "" for none) and the fleet CA.
func clientTLS(t *testing.T, certs, name string) *tls.Config {
	t.Helper()
	pem, err := os.ReadFile(filepath.Join(certs, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pem)
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if name != "" {
		pair, err := tls.LoadX509KeyPair(filepath.Join(certs, name+".crt"), filepath.Join(certs, name+".key"))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg
}

// probe is an MQTT client of the TLS tests, recording what it receives.
type probe struct {
	c    mqtt.Client
	mu   sync.Mutex
	got  map[string][][]byte
	lost chan struct{}
}

func (p *probe) payloads(topic string) [][]byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([][]byte(nil), p.got[topic]...)
}

func dialProbe(t *testing.T, url, id string, cfg *tls.Config) (*probe, error) {
	t.Helper()
	p := &probe{got: map[string][][]byte{}, lost: make(chan struct{})}
	opts := mqtt.NewClientOptions().AddBroker(url).SetClientID(id).SetProtocolVersion(4).
		SetConnectTimeout(5 * time.Second).SetAutoReconnect(false).SetTLSConfig(cfg).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) {
			p.mu.Lock()
			p.got[m.Topic()] = append(p.got[m.Topic()], append([]byte(nil), m.Payload()...))
			p.mu.Unlock()
		}).
		SetConnectionLostHandler(func(mqtt.Client, error) { close(p.lost) })
	p.c = mqtt.NewClient(opts)
	tok := p.c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect as %s: timed out", id)
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { p.c.Disconnect(50) })
	return p, nil
}

func (p *probe) subscribe(t *testing.T, filter string) byte {
	t.Helper()
	tok := p.c.Subscribe(filter, 1, nil)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %s: %v", filter, tok.Error())
	}
	return tok.(*mqtt.SubscribeToken).Result()[filter]
}

// runTLSFleet is the walking skeleton's path with device certificates:
// two agents connect with their certificates, a model is pushed and
// assigned, activates, answers inferences that the controller counts; then
// the broker's ACL is probed with a third device's valid certificate.
// embedded says whether the broker is the controller's own, which also
// ties the client id to the certificate and drops a client that publishes
// where it may not.
func runTLSFleet(t *testing.T, f *fleet, certs string, embedded bool) {
	f.agentFlags = agentTLS(certs)
	f.startAgent(tlsDevA, "region=eu")
	f.startAgent(tlsDevB, "region=us")
	f.eventually("both TLS agents online", 30*time.Second, func() (bool, string) {
		online := 0
		for _, d := range f.devices("") {
			if d.Online {
				online++
			}
		}
		return online == 2, fmt.Sprintf("%d online", online)
	})
	f.pushExample("1.0.0")
	ctx := context.Background()
	if ids, err := f.client.Assign(ctx, client.Assignment{Model: "grid-anomaly", Version: "1.0.0", Selector: "region in (eu,us)"}); err != nil || len(ids) != 2 {
		t.Fatalf("assign: %v %v", ids, err)
	}
	f.waitActive("1.0.0", tlsDevA, tlsDevB)
	const requests = 5
	for range requests {
		if v := f.infer(tlsDevA, 2); v != "1.0.0" {
			t.Fatalf("%s answered with %s", tlsDevA, v)
		}
	}
	f.eventually("inferences of "+tlsDevA+" counted", 60*time.Second, func() (bool, string) {
		d, err := f.client.Device(ctx, tlsDevA)
		if err != nil {
			return false, err.Error()
		}
		return d.Inferences == requests, fmt.Sprintf("%d counted", d.Inferences)
	})

	// An observer with the controller's identity sees every device's
	// telemetry and b's retained desired state: there is something to steal.
	obs, err := dialProbe(t, f.broker, "e2e-observer", clientTLS(t, certs, "controller"))
	if err != nil {
		t.Fatalf("controller certificate refused: %v\n%s", err, f.logs())
	}
	obs.subscribe(t, "ef/v1/dev/+/telemetry")
	obs.subscribe(t, "ef/v1/dev/"+tlsDevB+"/desired")
	f.eventually("the observer reads b's retained desired state", 10*time.Second, func() (bool, string) {
		return len(obs.payloads("ef/v1/dev/"+tlsDevB+"/desired")) > 0, "nothing yet"
	})

	// Without a certificate, with a plain connection, or with a certificate
	// of another CA, nobody gets in.
	rogue := filepath.Join(t.TempDir(), "rogue")
	fleetTool(t, "certs", "init", "--dir", rogue)
	fleetTool(t, "certs", "device", tlsDevB, "--dir", rogue)
	rogueTLS := clientTLS(t, certs, "")
	rogueTLS.Certificates = clientTLS(t, rogue, "devices/"+tlsDevB).Certificates
	plainURL := "tcp://" + strings.TrimPrefix(f.broker, "ssl://")
	for name, c := range map[string]struct {
		url string
		cfg *tls.Config
	}{
		"no client certificate":     {f.broker, clientTLS(t, certs, "")},
		"plain TCP":                 {plainURL, nil},
		"certificate of another CA": {f.broker, rogueTLS},
	} {
		if _, err := dialProbe(t, c.url, tlsDevB+"-probe", c.cfg); err == nil {
			t.Errorf("%s: connected to %s, want refused", name, c.url)
		}
	}

	// Device c, with its own valid certificate, may not read b's desired
	// state nor write b's telemetry.
	c, err := dialProbe(t, f.broker, tlsDevC, clientTLS(t, certs, "devices/"+tlsDevC))
	if err != nil {
		t.Fatalf("device c with its certificate: %v", err)
	}
	granted := c.subscribe(t, "ef/v1/dev/"+tlsDevB+"/desired")
	if embedded && granted != 0x80 {
		t.Errorf("embedded broker granted device c a subscription to b's desired state (%#x)", granted)
	}
	wildcard := c.subscribe(t, "ef/v1/dev/+/desired")
	mine := []byte("telemetry-of-c")
	if tok := c.c.Publish("ef/v1/dev/"+tlsDevC+"/telemetry", 1, false, mine); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("device c publishing its own telemetry: %v", tok.Error())
	}
	f.eventually("device c's own telemetry reaches the observer", 10*time.Second, func() (bool, string) {
		return len(obs.payloads("ef/v1/dev/"+tlsDevC+"/telemetry")) > 0, "nothing yet"
	})
	forged := []byte("forged-by-tls-c")
	c.c.Publish("ef/v1/dev/"+tlsDevB+"/telemetry", 1, false, forged).WaitTimeout(5 * time.Second)
	if embedded {
		select {
		case <-c.lost:
		case <-time.After(5 * time.Second):
			t.Error("embedded broker kept device c connected after it published to b's telemetry")
		}
	}
	time.Sleep(time.Second)
	for _, p := range obs.payloads("ef/v1/dev/" + tlsDevB + "/telemetry") {
		if bytes.Equal(p, forged) {
			t.Fatal("device c's forged telemetry for b reached the controller's side")
		}
	}
	c.mu.Lock()
	for topic, ps := range c.got {
		if strings.HasPrefix(topic, "ef/v1/dev/"+tlsDevB+"/") {
			t.Errorf("device c read %s (%d messages; subscription granted %#x, wildcard %#x)", topic, len(ps), granted, wildcard)
		}
	}
	c.mu.Unlock()
	t.Logf("device c's subscriptions to b's desired state: exact %#x, wildcard %#x; nothing delivered", granted, wildcard)

	// The fleet still works after the probes.
	if v := f.infer(tlsDevB, 1); v != "1.0.0" {
		t.Fatalf("%s answered with %s after the probes", tlsDevB, v)
	}
}

func TestTLSEmbeddedBroker(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	// Not parallel: on two cores, more agent processes at once push the
	// timing-sensitive simulator and rollout tests past their deadlines.
	certs := makeCerts(t)
	f := startController(t, "",
		"--mqtt-tls-cert", filepath.Join(certs, "controller.crt"),
		"--mqtt-tls-key", filepath.Join(certs, "controller.key"),
		"--mqtt-client-ca", filepath.Join(certs, "ca.crt"))
	f.broker = "ssl://" + strings.TrimPrefix(f.broker, "tcp://")
	runTLSFleet(t, f, certs, true)
}

func TestTLSMosquitto(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	// Not parallel: on two cores, more agent processes at once push the
	// timing-sensitive simulator and rollout tests past their deadlines.
	certs := makeCerts(t)
	url := startSecureMosquitto(t, certs)
	f := startController(t, url,
		"--mqtt-tls-cert", filepath.Join(certs, "controller.crt"),
		"--mqtt-tls-key", filepath.Join(certs, "controller.key"),
		"--mqtt-client-ca", filepath.Join(certs, "ca.crt"))
	runTLSFleet(t, f, certs, false)
}

// shippedACL returns the absolute path of scripts/mosquitto/edgefleet.acl.
func shippedACL(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "mosquitto", "edgefleet.acl"))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// startSecureMosquitto runs Mosquitto with the shipped
// scripts/mosquitto/edgefleet.conf and edgefleet.acl, changing only what
// is machine-specific (paths, port), and returns its ssl:// URL.
func startSecureMosquitto(t *testing.T, certs string) string {
	t.Helper()
	bin := mosquittoBinary()
	if bin == "" {
		msg := "mosquitto is not installed: the Mosquitto TLS end-to-end test did NOT run (apt-get install -y mosquitto)"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		fmt.Fprintln(os.Stderr, "\n!!!!! SKIPPED:", msg, "!!!!!")
		t.Skip(msg)
	}
	shipped, err := os.ReadFile(filepath.Join("..", "mosquitto", "edgefleet.conf"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p := port(t)
	set := map[string]string{
		"listener":             fmt.Sprintf("%d 127.0.0.1", p),
		"cafile":               filepath.Join(certs, "ca.crt"),
		"certfile":             filepath.Join(certs, "broker.crt"),
		"keyfile":              filepath.Join(certs, "broker.key"),
		"acl_file":             shippedACL(t),
		"persistence_location": dir + "/",
	}
	var conf strings.Builder
	seen := map[string]bool{}
	for _, line := range strings.Split(string(shipped), "\n") {
		directive, _, _ := strings.Cut(line, " ")
		if v, ok := set[directive]; ok {
			line = directive + " " + v
			seen[directive] = true
		}
		conf.WriteString(line + "\n")
	}
	for d := range set {
		if !seen[d] {
			t.Fatalf("scripts/mosquitto/edgefleet.conf has no %s line", d)
		}
	}
	if !regexp.MustCompile(`(?m)^require_certificate true$`).MatchString(conf.String()) ||
		!regexp.MustCompile(`(?m)^use_identity_as_username true$`).MatchString(conf.String()) {
		t.Fatal("scripts/mosquitto/edgefleet.conf must require certificates and use them as the identity")
	}
	// Started as root, Mosquitto would drop to the mosquitto user, which
	// cannot read the test's private temporary directories.
	if os.Geteuid() == 0 {
		conf.WriteString("user root\n")
	}
	confPath := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(confPath, []byte(conf.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := proc.Start("mosquitto", filepath.Join(dir, "mosquitto.log"), bin, "-c", confPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Kill() })
	addr := fmt.Sprintf("127.0.0.1:%d", p)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return "ssl://" + addr
		}
		if done, err := m.Exited(); done {
			b, _ := os.ReadFile(filepath.Join(dir, "mosquitto.log"))
			t.Fatalf("mosquitto exited: %v\n%s", err, b)
		}
		if time.Now().After(deadline) {
			t.Fatal("mosquitto did not listen within 10s")
		}
		time.Sleep(50 * time.Millisecond)
	}
}
