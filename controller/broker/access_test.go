package broker

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/edgefleet/edgefleet/proto/wire"
)

func TestAllowed(t *testing.T) {
	tests := []struct {
		identity, topic string
		write, want     bool
	}{
		{"dev-a", "ef/v1/dev/dev-a/telemetry", true, true},
		{"dev-a", "ef/v1/dev/dev-a/hello", true, true},
		{"dev-a", "ef/v1/dev/dev-a/state", true, true},
		{"dev-a", "ef/v1/dev/dev-a/presence", true, true},
		{"dev-a", "ef/v1/dev/dev-a/events", true, true},
		{"dev-a", "ef/v1/dev/dev-a/desired", false, true},
		{"dev-a", "ef/v1/dev/dev-a/ack", false, true},
		{"dev-a", "ef/v1/dev/dev-a/cmd", false, true},
		// Wrong direction on its own tree.
		{"dev-a", "ef/v1/dev/dev-a/desired", true, false},
		{"dev-a", "ef/v1/dev/dev-a/cmd", true, false},
		{"dev-a", "ef/v1/dev/dev-a/keys", false, true},
		{"dev-a", "ef/v1/dev/dev-a/keys", true, false},
		{"dev-a", "ef/v1/dev/dev-b/keys", false, false},
		{"dev-a", "ef/v1/dev/dev-a/telemetry", false, false},
		// Another device's tree.
		{"dev-a", "ef/v1/dev/dev-b/telemetry", true, false},
		{"dev-a", "ef/v1/dev/dev-b/desired", false, false},
		// Wildcards, even inside its own tree, and topics outside the tree.
		{"dev-a", "ef/v1/dev/dev-a/#", false, false},
		{"dev-a", "ef/v1/dev/+/desired", false, false},
		{"dev-a", "ef/v1/dev/#", false, false},
		{"dev-a", "#", false, false},
		{"dev-a", "$SYS/broker/clients", false, false},
		{"dev-a", "$share/g/ef/v1/dev/dev-a/desired", false, false},
		{"dev-a", "ef/v1/dev/dev-a/desired/extra", false, false},
		{"dev-a", "", true, false},
		// A prefix of another id is another id.
		{"dev", "ef/v1/dev/dev-a/telemetry", true, false},
		// The controller may do anything; nobody else may.
		{ControllerIdentity, "ef/v1/dev/+/telemetry", false, true},
		{ControllerIdentity, "ef/v1/dev/dev-b/desired", true, true},
		{"", "ef/v1/dev/dev-a/telemetry", true, false},
	}
	for _, tt := range tests {
		if got := Allowed(tt.identity, tt.topic, tt.write); got != tt.want {
			t.Errorf("Allowed(%q, %q, write=%v) = %v, want %v", tt.identity, tt.topic, tt.write, got, tt.want)
		}
	}
}

// pki is a throwaway fleet CA with certificates issued on demand, laid out
// as `fleet certs` lays them out.
type pki struct {
	t   *testing.T
	dir string
	ca  *x509.Certificate
	key *ecdsa.PrivateKey
}

func newPKI(t *testing.T, name string) *pki {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &pki{t: t, dir: t.TempDir(), ca: ca, key: key}
	p.write("ca.crt", "CERTIFICATE", der)
	return p
}

func (p *pki) write(name, typ string, der []byte) string {
	path := filepath.Join(p.dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		p.t.Fatal(err)
	}
	return path
}

func (p *pki) caFile() string { return filepath.Join(p.dir, "ca.crt") }

// issue returns the certificate and key files for cn; server adds server
// usage for 127.0.0.1.
func (p *pki) issue(cn string, server bool) (crt, key string) {
	p.t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		p.t.Fatal(err)
	}
	n, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: n, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &k.PublicKey, p.key)
	if err != nil {
		p.t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		p.t.Fatal(err)
	}
	base := strings.NewReplacer("/", "_").Replace(cn)
	return p.write(base+".crt", "CERTIFICATE", der), p.write(base+".key", "PRIVATE KEY", kder)
}

// clientTLS is a client's TLS configuration trusting p's CA, with the
// certificate of cn from issuer (nil: no client certificate).
func (p *pki) clientTLS(issuer *pki, cn string) *tls.Config {
	p.t.Helper()
	pool := x509.NewCertPool()
	pool.AddCert(p.ca)
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if issuer != nil {
		crt, key := issuer.issue(cn, false)
		c, err := tls.LoadX509KeyPair(crt, key)
		if err != nil {
			p.t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return cfg
}

// tlsClient is one paho client of a TLS test broker and what it received.
type tlsClient struct {
	c    paho.Client
	mu   sync.Mutex
	got  map[string][]byte
	lost chan struct{}
}

func (c *tlsClient) received(topic string) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	b, ok := c.got[topic]
	return b, ok
}

type dialOpts struct {
	url      string
	tls      *tls.Config
	id       string
	username string
	password string
	will     string
}

func dialTLS(t *testing.T, o dialOpts) (*tlsClient, error) {
	t.Helper()
	tc := &tlsClient{got: map[string][]byte{}, lost: make(chan struct{})}
	po := paho.NewClientOptions().AddBroker(o.url).SetClientID(o.id).SetProtocolVersion(4).
		SetConnectTimeout(3 * time.Second).SetAutoReconnect(false).SetTLSConfig(o.tls).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
			tc.mu.Lock()
			tc.got[m.Topic()] = append([]byte(nil), m.Payload()...)
			tc.mu.Unlock()
		}).
		SetConnectionLostHandler(func(paho.Client, error) { close(tc.lost) })
	if o.username != "" {
		po.SetUsername(o.username).SetPassword(o.password)
	}
	if o.will != "" {
		po.SetWill(o.will, "gone", 1, true)
	}
	tc.c = paho.NewClient(po)
	tok := tc.c.Connect()
	if !tok.WaitTimeout(5 * time.Second) {
		t.Fatalf("connect as %q: timed out", o.id)
	}
	if err := tok.Error(); err != nil {
		return nil, err
	}
	t.Cleanup(func() { tc.c.Disconnect(50) })
	return tc, nil
}

// subscribe returns the granted QoS (0x80 = refused).
func (c *tlsClient) subscribe(t *testing.T, filter string) byte {
	t.Helper()
	tok := c.c.Subscribe(filter, 1, nil)
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %s: %v", filter, tok.Error())
	}
	return tok.(*paho.SubscribeToken).Result()[filter]
}

func TestTLSBrokerConfinesDevices(t *testing.T) {
	fleetCA := newPKI(t, "fleet CA")
	rogueCA := newPKI(t, "rogue CA")
	srvCrt, srvKey := fleetCA.issue(ControllerIdentity, true)
	cfg, err := ServerTLS(srvCrt, srvKey, fleetCA.caFile())
	if err != nil {
		t.Fatal(err)
	}
	b, _ := start(t, Options{TLS: cfg})
	if !b.TLS() {
		t.Fatal("TLS() = false")
	}
	url := "ssl://" + b.Addr().String()

	// The controller identity, on the public listener with its certificate,
	// sees everything and leaves a retained desired state for dev-b.
	ctrl, err := dialTLS(t, dialOpts{url: url, tls: fleetCA.clientTLS(fleetCA, ControllerIdentity), id: "ctl"})
	if err != nil {
		t.Fatalf("controller certificate refused: %v", err)
	}
	if q := ctrl.subscribe(t, wire.AllDevices(wire.KindTelemetry)); q != 1 {
		t.Fatalf("controller subscribe granted %#x", q)
	}
	publish(t, ctrl.c, wire.Topic("dev-b", wire.KindDesired), []byte("desired-for-b"))
	publish(t, ctrl.c, wire.Topic("dev-a", wire.KindDesired), []byte("desired-for-a"))

	refused := []struct {
		name string
		o    dialOpts
	}{
		{"no client certificate", dialOpts{url: url, tls: fleetCA.clientTLS(nil, ""), id: "dev-a"}},
		{"certificate of another CA", dialOpts{url: url, tls: fleetCA.clientTLS(rogueCA, "dev-a"), id: "dev-a"}},
		{"rogue controller certificate", dialOpts{url: url, tls: fleetCA.clientTLS(rogueCA, ControllerIdentity), id: "ctl2"}},
		{"plain TCP", dialOpts{url: "tcp://" + b.Addr().String(), id: "dev-a"}},
		{"device certificate, another device's client id", dialOpts{url: url, tls: fleetCA.clientTLS(fleetCA, "dev-a"), id: "dev-b"}},
		{"device certificate, last will on another device's topic", dialOpts{url: url, tls: fleetCA.clientTLS(fleetCA, "dev-a"), id: "dev-a", will: wire.Topic("dev-b", wire.KindDesired)}},
		{"common name that is no device id", dialOpts{url: url, tls: fleetCA.clientTLS(fleetCA, "a/+"), id: "a/+"}},
		{"internal listener without the secret", dialOpts{url: "tcp://" + b.InternalAddr().String(), id: "x", username: ControllerIdentity, password: "guess"}},
	}
	for _, r := range refused {
		if _, err := dialTLS(t, r.o); err == nil {
			t.Errorf("%s: connected, want refused", r.name)
		}
	}

	// Device A claims to be the controller by username; the certificate
	// decides, so it is still device A.
	a, err := dialTLS(t, dialOpts{url: url, tls: fleetCA.clientTLS(fleetCA, "dev-a"), id: "dev-a", username: ControllerIdentity, password: "x",
		will: wire.Topic("dev-a", wire.KindPresence)})
	if err != nil {
		t.Fatalf("device a with its own certificate: %v", err)
	}
	if q := a.subscribe(t, wire.Topic("dev-b", wire.KindDesired)); q != 0x80 {
		t.Errorf("device a subscribing to dev-b's desired state: granted %#x, want 0x80", q)
	}
	if q := a.subscribe(t, "ef/v1/dev/+/desired"); q != 0x80 {
		t.Errorf("device a subscribing to every desired state: granted %#x, want 0x80", q)
	}
	if q := a.subscribe(t, wire.Topic("dev-a", wire.KindDesired)); q != 1 {
		t.Errorf("device a subscribing to its own desired state: granted %#x", q)
	}
	publish(t, a.c, wire.Topic("dev-a", wire.KindTelemetry), []byte("mine"))
	deadline := time.Now().Add(3 * time.Second)
	for {
		_, gotOwn := a.received(wire.Topic("dev-a", wire.KindDesired))
		_, ctrlGot := ctrl.received(wire.Topic("dev-a", wire.KindTelemetry))
		if gotOwn && ctrlGot {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("device a's own traffic did not flow: own desired %v, controller got telemetry %v", gotOwn, ctrlGot)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if b, ok := a.received(wire.Topic("dev-b", wire.KindDesired)); ok {
		t.Fatalf("device a read dev-b's desired state %q", b)
	}

	// Publishing into dev-b's tree: an MQTT 3.1.1 broker can only drop the
	// connection, and the message must go nowhere.
	a.c.Publish(wire.Topic("dev-b", wire.KindTelemetry), 1, false, []byte("forged")).WaitTimeout(2 * time.Second)
	select {
	case <-a.lost:
	case <-time.After(3 * time.Second):
		t.Error("broker kept device a connected after it published to dev-b's telemetry")
	}
	time.Sleep(200 * time.Millisecond)
	if b, ok := ctrl.received(wire.Topic("dev-b", wire.KindTelemetry)); ok {
		t.Fatalf("forged telemetry for dev-b reached the controller: %q", b)
	}

	// The internal listener admits the controller's link with the secret.
	user, pass := b.InternalCredentials()
	if user != ControllerIdentity || len(pass) < 32 {
		t.Fatalf("InternalCredentials = %q, %d-byte password", user, len(pass))
	}
	in, err := dialTLS(t, dialOpts{url: "tcp://" + b.InternalAddr().String(), id: "edgefleet-controller", username: user, password: pass})
	if err != nil {
		t.Fatalf("internal listener with the secret: %v", err)
	}
	if q := in.subscribe(t, "ef/v1/dev/#"); q != 1 {
		t.Fatalf("internal controller subscribe granted %#x", q)
	}
}

func TestTLSConfigMustVerifyClients(t *testing.T) {
	_, err := New(Options{Listen: "127.0.0.1:0", TLS: &tls.Config{ClientAuth: tls.VerifyClientCertIfGiven}})
	if err == nil || !strings.Contains(err.Error(), "ServerTLS") {
		t.Fatalf("New with optional client certificates: %v", err)
	}
}

func TestServerTLSErrorsNameTheFile(t *testing.T) {
	p := newPKI(t, "ca")
	crt, key := p.issue("srv", true)
	for _, tt := range []struct{ crt, key, ca, want string }{
		{"/nonexistent.crt", key, p.caFile(), "/nonexistent.crt"},
		{crt, key, "/nonexistent-ca.crt", "/nonexistent-ca.crt"},
		{crt, key, key, "holds no PEM certificate"},
	} {
		if _, err := ServerTLS(tt.crt, tt.key, tt.ca); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("ServerTLS(%s, %s, %s) = %v, want an error naming %q", tt.crt, tt.key, tt.ca, err, tt.want)
		}
	}
}

// FuzzAllowed checks the ACL's invariant on any topic a client may send:
// a device is granted only exact topics of its own tree.
func FuzzAllowed(f *testing.F) {
	for _, s := range []string{"ef/v1/dev/a/telemetry", "ef/v1/dev/a/desired", "ef/v1/dev/+/desired", "ef/v1/dev/a/#", "#", "", "$SYS/x", "ef/v1/dev/a/telemetry/x", "ef/v1/dev//telemetry"} {
		f.Add("a", s, true)
		f.Add("a", s, false)
	}
	f.Fuzz(func(t *testing.T, identity, topic string, write bool) {
		if !Allowed(identity, topic, write) || identity == ControllerIdentity {
			return
		}
		id, kind, err := wire.ParseTopic(topic)
		if err != nil || id != identity || strings.ContainsAny(topic, "+#") || topic != wire.Topic(identity, kind) {
			t.Fatalf("Allowed(%q, %q, %v) granted a topic outside the device's own tree", identity, topic, write)
		}
		if deviceWrites[kind] != write {
			t.Fatalf("Allowed(%q, %q, write=%v) granted the wrong direction", identity, topic, write)
		}
	})
}

// TestIdleConnectionsAreClosed: a client that connects and never finishes
// the TLS handshake or sends CONNECT is cut off after ConnectTimeout, with
// TLS and without; a client that does connect keeps its connection.
func TestIdleConnectionsAreClosed(t *testing.T) {
	p := newPKI(t, "ca")
	crt, key := p.issue(ControllerIdentity, true)
	cfg, err := ServerTLS(crt, key, p.caFile())
	if err != nil {
		t.Fatal(err)
	}
	for _, tlsCfg := range []*tls.Config{nil, cfg} {
		b, _ := start(t, Options{TLS: tlsCfg, ConnectTimeout: 300 * time.Millisecond})
		c, err := net.Dial("tcp", b.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		began := time.Now()
		if n, err := c.Read(make([]byte, 1)); err == nil || n != 0 {
			t.Fatalf("TLS %v: idle connection read %d bytes, %v", tlsCfg != nil, n, err)
		}
		if waited := time.Since(began); waited > 3*time.Second {
			t.Fatalf("TLS %v: idle connection closed only after %s", tlsCfg != nil, waited)
		}
		c.Close()
	}
	// A real client outlives the connect deadline.
	b, _ := start(t, Options{TLS: cfg, ConnectTimeout: 300 * time.Millisecond})
	ctl, err := dialTLS(t, dialOpts{url: "ssl://" + b.Addr().String(), tls: p.clientTLS(p, ControllerIdentity), id: "ctl"})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(600 * time.Millisecond)
	publish(t, ctl.c, wire.Topic("d", wire.KindDesired), []byte("still here"))
}
