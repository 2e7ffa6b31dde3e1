package link

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
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
	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// testCA issues certificates into dir, the way `fleet certs` lays them out.
type testCA struct {
	t   *testing.T
	dir string
	crt *x509.Certificate
	key *ecdsa.PrivateKey
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test fleet CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	crt, _ := x509.ParseCertificate(der)
	ca := &testCA{t: t, dir: t.TempDir(), crt: crt, key: key}
	ca.write("ca.crt", "CERTIFICATE", der)
	return ca
}

func (ca *testCA) write(name, typ string, der []byte) string {
	p := filepath.Join(ca.dir, name)
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		ca.t.Fatal(err)
	}
	return p
}

func (ca *testCA) issue(cn string, server bool) (crt, key string) {
	ca.t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		ca.t.Fatal(err)
	}
	n, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: n, Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.crt, &k.PublicKey, ca.key)
	if err != nil {
		ca.t.Fatal(err)
	}
	kder, _ := x509.MarshalPKCS8PrivateKey(k)
	return ca.write(cn+".crt", "CERTIFICATE", der), ca.write(cn+".key", "PRIVATE KEY", kder)
}

// cnHook admits every client and records the certificate name each
// presented, so the test sees what the broker saw.
type cnHook struct {
	mochi.HookBase
	mu  sync.Mutex
	cns map[string]string // client id -> certificate CN
}

func (h *cnHook) ID() string { return "record-cn" }
func (h *cnHook) Provides(b byte) bool {
	return b == mochi.OnConnectAuthenticate || b == mochi.OnACLCheck
}
func (h *cnHook) OnACLCheck(*mochi.Client, string, bool) bool { return true }
func (h *cnHook) OnConnectAuthenticate(cl *mochi.Client, _ packets.Packet) bool {
	if tc, ok := cl.Net.Conn.(*tls.Conn); ok {
		if chains := tc.ConnectionState().VerifiedChains; len(chains) > 0 {
			h.mu.Lock()
			h.cns[cl.ID] = chains[0][0].Subject.CommonName
			h.mu.Unlock()
		}
	}
	return true
}

func (h *cnHook) cn(id string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.cns[id]
}

// startTLSBroker runs mochi with a TLS listener requiring client
// certificates of ca, and returns its ssl:// URL and a plain tcp:// one
// for the test's observer.
func startTLSBroker(t *testing.T, ca *testCA) (tlsURL, plainURL string, hook *cnHook) {
	t.Helper()
	crt, key := ca.issue("broker", true)
	cert, err := tls.LoadX509KeyPair(crt, key)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.crt)
	srv := mochi.New(&mochi.Options{Logger: slog.New(slog.DiscardHandler)})
	hook = &cnHook{cns: map[string]string{}}
	if err := srv.AddHook(hook, nil); err != nil {
		t.Fatal(err)
	}
	secure := listeners.NewTCP(listeners.Config{ID: "tls", Address: "127.0.0.1:0", TLSConfig: &tls.Config{
		Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert}})
	plain := listeners.NewTCP(listeners.Config{ID: "plain", Address: "127.0.0.1:0"})
	for _, l := range []*listeners.TCP{secure, plain} {
		if err := srv.AddListener(l); err != nil {
			t.Fatal(err)
		}
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return "ssl://" + secure.Address(), "tcp://" + plain.Address(), hook
}

// observe subscribes to a device's presence on the plain listener.
func observe(t *testing.T, url, id string) <-chan []byte {
	t.Helper()
	got := make(chan []byte, 16)
	c := paho.NewClient(paho.NewClientOptions().AddBroker(url).SetClientID("observer-" + id).SetProtocolVersion(4))
	if tok := c.Connect(); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("observer connect: %v", tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(10) })
	tok := c.Subscribe(wire.Topic(id, wire.KindPresence), 1, func(_ paho.Client, m paho.Message) {
		select {
		case got <- m.Payload():
		default:
		}
	})
	if !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
		t.Fatalf("observer subscribe: %v", tok.Error())
	}
	return got
}

func TestLinkConnectsWithClientCertificate(t *testing.T) {
	ca := newTestCA(t)
	tlsURL, plainURL, hook := startTLSBroker(t, ca)
	for _, viaDial := range []bool{false, true} {
		id := "dev-direct"
		if viaDial {
			id = "dev-dialed"
		}
		t.Run(id, func(t *testing.T) {
			crt, key := ca.issue(id, false)
			seen := observe(t, plainURL, id)
			o := Options{Broker: tlsURL, DeviceID: id, TLSCert: crt, TLSKey: key, TLSCA: filepath.Join(ca.dir, "ca.crt")}
			if viaDial {
				o.Dial = (&cuttableDialer{}).Dial
			}
			l, rec, _ := startLink(t, o)
			waitUntil(t, "connected over TLS", func() bool { return rec.connects.Load() == 1 && l.Connected() })
			select {
			case <-seen:
			case <-time.After(5 * time.Second):
				t.Fatal("presence over TLS did not reach the broker's other listener")
			}
			if cn := hook.cn(id); cn != id {
				t.Fatalf("broker saw certificate %q for client %s", cn, id)
			}
		})
	}
}

func TestLinkTLSOptionsChecked(t *testing.T) {
	ca := newTestCA(t)
	crt, key := ca.issue("dev-1", false)
	caFile := filepath.Join(ca.dir, "ca.crt")
	cases := []struct {
		name string
		o    Options
		want string
	}{
		{"tls files with tcp", Options{Broker: "tcp://127.0.0.1:1", DeviceID: "dev-1", TLSCert: crt, TLSKey: key}, "use ssl://"},
		{"cert without key", Options{Broker: "ssl://127.0.0.1:1", DeviceID: "dev-1", TLSCert: crt}, "both"},
		{"another device's certificate", Options{Broker: "ssl://127.0.0.1:1", DeviceID: "dev-2", TLSCert: crt, TLSKey: key}, `is for "dev-1"`},
		{"missing certificate", Options{Broker: "ssl://127.0.0.1:1", DeviceID: "dev-1", TLSCert: crt + ".gone", TLSKey: key}, "fleet certs device dev-1"},
		{"CA that is no PEM", Options{Broker: "ssl://127.0.0.1:1", DeviceID: "dev-1", TLSCA: key + ".x"}, "broker CA"},
	}
	if err := os.WriteFile(key+".x", []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range cases {
		_, err := New(c.o)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: New = %v, want an error containing %q", c.name, err, c.want)
		}
	}
	if _, err := New(Options{Broker: "ssl://127.0.0.1:1", DeviceID: "dev-1", TLSCert: crt, TLSKey: key, TLSCA: caFile}); err != nil {
		t.Fatalf("valid TLS options: %v", err)
	}
}
