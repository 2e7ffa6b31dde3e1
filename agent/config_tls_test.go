package agent

import (
	"bytes"
	"strings"
	"testing"
)

func TestConfigTLS(t *testing.T) {
	file := writeFile(t, "id: pos-17\nbroker: ssl://ctl:8883\ntls_cert: /file/pos-17.crt\ntls_key: /file/pos-17.key\ntls_ca: /file/ca.crt\n")
	cfg, err := LoadConfig([]string{"--config", file, "--tls-ca", "/flag/ca.crt"},
		env(map[string]string{"EDGEFLEET_TLS_KEY": "/env/pos-17.key"}), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.TLSCert != "/file/pos-17.crt" || cfg.TLSKey != "/env/pos-17.key" || cfg.TLSCA != "/flag/ca.crt" {
		t.Fatalf("TLS settings %q %q %q: want file, env and flag to win in that rising order", cfg.TLSCert, cfg.TLSKey, cfg.TLSCA)
	}
	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"cert without key", []string{"--broker", "ssl://ctl:8883", "--tls-cert", "a.crt"}, "tls_cert and tls_key go together"},
		{"TLS with a plain broker", []string{"--broker", "tcp://ctl:1883", "--tls-cert", "a.crt", "--tls-key", "a.key"}, "use ssl://ctl:1883"},
		{"CA with a plain broker", []string{"--broker", "tcp://ctl:1883", "--tls-ca", "ca.crt"}, "not encrypted"},
	} {
		_, err := LoadConfig(append([]string{"--id", "pos-17"}, c.args...), env(nil), &bytes.Buffer{})
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error containing %q", c.name, err, c.want)
		}
	}
	// An unknown key's error lists the TLS keys among the known ones.
	_, err = LoadConfig([]string{"--config", writeFile(t, "tls_certificate: x\n")}, env(nil), &bytes.Buffer{})
	if err == nil || !strings.Contains(err.Error(), "tls_cert, tls_key, tls_ca") {
		t.Fatalf("unknown key: %v", err)
	}
}
