package cli

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/edgefleet/edgefleet/proto/wire"
)

// ControllerCN is the certificate common name of the controller's own
// MQTT client; broker ACLs grant it every device's tree.
const ControllerCN = "edgefleet-controller"

// BrokerCN is the common name of an external broker's server certificate
// (`fleet certs broker`). It is a server certificate only: a broker that
// is broken into must not hold a key that could pose as the controller.
const BrokerCN = "edgefleet-broker"

func runCerts(_ context.Context, e *exec, args []string) error {
	if len(args) == 0 {
		return usageErr("want: fleet certs init [--dir DIR] [--host H]... | fleet certs device ID [--dir DIR] | fleet certs broker --host H... [--dir DIR]")
	}
	var g globals
	fs := newFlags(e, "certs "+args[0], &g)
	dir := fs.String("dir", "certs", "directory of the fleet's CA and certificates")
	var hosts multiFlag
	fs.Var(&hosts, "host", "extra DNS name or IP of the controller's certificate (repeatable)")
	validity := fs.Duration("validity", 2*365*24*time.Hour, "how long the certificates are valid")
	pos, err := parse(fs, args[1:])
	if err != nil {
		return err
	}
	switch args[0] {
	case "init":
		if len(pos) != 0 {
			return usageErr("certs init takes no arguments")
		}
		return certsInit(e, *dir, hosts, *validity)
	case "device":
		if len(pos) != 1 {
			return usageErr("want one device ID")
		}
		if err := wire.ValidateDeviceID(pos[0]); err != nil {
			return err
		}
		if pos[0] == ControllerCN || pos[0] == BrokerCN {
			return fmt.Errorf("%q is reserved for the controller and the broker; a device with that id would be granted their access", pos[0])
		}
		return certsIssue(e, *dir, pos[0], nil, *validity, filepath.Join("devices", pos[0]))
	case "broker":
		if len(pos) != 0 {
			return usageErr("certs broker takes no arguments; name the broker's hosts with --host")
		}
		if len(hosts) == 0 {
			return usageErr("certs broker needs at least one --host: the DNS name or IP devices and the controller dial")
		}
		return certsIssueServer(e, *dir, BrokerCN, hosts, *validity, "broker")
	}
	return usageErr("unknown certs subcommand %q: want init, device or broker", args[0])
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// certsInit creates the CA and the controller's certificate (server and
// client: the controller serves the broker and connects to it).
func certsInit(e *exec, dir string, hosts []string, validity time.Duration) error {
	caCrt, caKey := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	if _, err := os.Stat(caCrt); err == nil {
		return fmt.Errorf("%s exists; refusing to replace the fleet's CA (every device certificate depends on it)", caCrt)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "Edgefleet fleet CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(validity + 365*24*time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return err
	}
	if err := writePEMPair(caCrt, caKey, der, key); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "CA: %s (keep %s offline once devices are enrolled)\n", caCrt, caKey)
	return certsIssue(e, dir, ControllerCN, append([]string{"127.0.0.1", "localhost"}, hosts...), validity, "controller")
}

// certsIssueServer signs a server-only certificate for an external
// broker (Mosquitto's certfile/keyfile).
func certsIssueServer(e *exec, dir, cn string, hosts []string, validity time.Duration, name string) error {
	return issue(e, dir, cn, hosts, validity, name, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth})
}

// certsIssue signs a certificate for cn with the CA in dir. With hosts it
// is a server certificate too.
func certsIssue(e *exec, dir, cn string, hosts []string, validity time.Duration, name string) error {
	usage := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if len(hosts) > 0 {
		usage = append(usage, x509.ExtKeyUsageServerAuth)
	}
	return issue(e, dir, cn, hosts, validity, name, usage)
}

func issue(e *exec, dir, cn string, hosts []string, validity time.Duration, name string, usage []x509.ExtKeyUsage) error {
	ca, caKey, err := loadCA(dir)
	if err != nil {
		return err
	}
	crtPath, keyPath := filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	if _, err := os.Stat(crtPath); err == nil {
		return fmt.Errorf("%s exists; remove it first to issue a new one", crtPath)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  usage,
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(crtPath), 0o700); err != nil {
		return err
	}
	if err := writePEMPair(crtPath, keyPath, der, key); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "certificate for %q: %s, key %s\n", cn, crtPath, keyPath)
	return nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

func writePEMPair(crtPath, keyPath string, der []byte, key *ecdsa.PrivateKey) error {
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return err
	}
	if err := writeExclusive(keyPath, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		return err
	}
	return writeExclusive(crtPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
}

func loadCA(dir string) (*x509.Certificate, *ecdsa.PrivateKey, error) {
	crtPath, keyPath := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	cb, err := os.ReadFile(crtPath)
	if err != nil {
		return nil, nil, fmt.Errorf("%w (run `fleet certs init --dir %s` first)", err, dir)
	}
	kb, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, fmt.Errorf("%w (the CA key is needed to issue certificates)", err)
	}
	cblock, _ := pem.Decode(cb)
	kblock, _ := pem.Decode(kb)
	if cblock == nil || kblock == nil {
		return nil, nil, fmt.Errorf("%s or %s is not PEM", crtPath, keyPath)
	}
	ca, err := x509.ParseCertificate(cblock.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", crtPath, err)
	}
	k, err := x509.ParsePKCS8PrivateKey(kblock.Bytes)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", keyPath, err)
	}
	key, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, fmt.Errorf("%s: want an ECDSA key, found %T", keyPath, k)
	}
	return ca, key, nil
}
