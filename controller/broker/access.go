package broker

import (
	"bytes"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/edgefleet/edgefleet/proto/wire"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// ControllerIdentity is the certificate common name of the controller's
// MQTT client (`fleet certs init` issues it). A client presenting a
// certificate with this name, signed by the fleet CA, may publish and
// subscribe everywhere. No device may carry this id.
const ControllerIdentity = "edgefleet-controller"

// deviceWrites and deviceReads are the kinds of its own tree a device may
// publish and subscribe to: the direction column of DESIGN.md's topic
// table. Anything else, other devices' trees and wildcards included, is
// refused.
var (
	deviceWrites = map[wire.Kind]bool{
		wire.KindHello: true, wire.KindState: true, wire.KindPresence: true,
		wire.KindEvents: true, wire.KindTelemetry: true,
	}
	deviceReads = map[wire.Kind]bool{
		wire.KindDesired: true, wire.KindAck: true, wire.KindCmd: true,
		wire.KindKeys: true,
	}
)

// Allowed reports whether identity may publish (write) or subscribe to
// (read) topic, which for a subscription is the filter as the client sent
// it. The controller may do anything anywhere; device X only the
// exact topics of its own tree, in the direction DESIGN.md gives them. A
// filter with a wildcard never names one exact topic, so a device's
// wildcard subscription is refused even inside its own tree.
func Allowed(identity, topic string, write bool) bool {
	if identity == "" {
		return false
	}
	if identity == ControllerIdentity {
		return true
	}
	id, kind, err := wire.ParseTopic(topic)
	if err != nil || id != identity {
		return false
	}
	if write {
		return deviceWrites[kind]
	}
	return deviceReads[kind]
}

// ServerTLS loads the public listener's TLS configuration: the broker's
// certificate and key, and the CA whose signature a client certificate
// must carry. Every client must present such a certificate; the handshake
// fails for one that does not, before any MQTT byte is read.
func ServerTLS(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("broker certificate %s / key %s: %w (create them with `fleet certs init`)", certFile, keyFile, err)
	}
	pem, err := os.ReadFile(clientCAFile)
	if err != nil {
		return nil, fmt.Errorf("client CA: %w (use the fleet CA, ca.crt from `fleet certs init`)", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("client CA %s holds no PEM certificate", clientCAFile)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// accessHook authenticates clients and confines them to their topics.
//
// On the public (TLS) listener a client's identity is the common name of
// its verified certificate. What the client claims (username, password)
// is ignored: the hook overwrites the username with the identity, which
// is what OnACLCheck reads later and what the broker's logs show, like
// Mosquitto's use_identity_as_username. A device's client id must equal
// its identity, so it can neither take over another device's session nor
// inherit its subscriptions.
//
// On the internal listener, which is bound to loopback and carries only
// the controller's own link, the client must present the per-process
// secret the broker generated at start (see Broker.InternalCredentials):
// any other local process is refused.
type accessHook struct {
	mqtt.HookBase
	secret []byte
	log    *slog.Logger
}

func newAccessHook(log *slog.Logger) (*accessHook, error) {
	raw := make([]byte, 32)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("broker: internal credentials: %w", err)
	}
	return &accessHook{secret: []byte(hex.EncodeToString(raw)), log: log}, nil
}

func (h *accessHook) ID() string { return "edgefleet-cert-acl" }

func (h *accessHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}

// errRefused explains, in the broker's log, why a client was refused.
var errRefused = errors.New("refused")

func (h *accessHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	identity, err := h.identify(cl, pk)
	if err == nil && identity != ControllerIdentity {
		err = checkDeviceConnect(identity, pk)
	}
	if err != nil {
		h.log.Warn("mqtt client refused", "client", cl.ID, "remote", cl.Net.Remote, "listener", cl.Net.Listener, "err", err)
		return false
	}
	cl.Properties.Username = []byte(identity)
	h.log.Debug("mqtt client authenticated", "client", cl.ID, "identity", identity, "remote", cl.Net.Remote)
	return true
}

// identify returns the identity of a connecting client.
func (h *accessHook) identify(cl *mqtt.Client, pk packets.Packet) (string, error) {
	if cl.Net.Listener == InternalListener {
		if subtle.ConstantTimeCompare(pk.Connect.Password, h.secret) != 1 || !bytes.Equal(pk.Connect.Username, []byte(ControllerIdentity)) {
			return "", fmt.Errorf("%w: the internal listener is for the controller's own link only", errRefused)
		}
		return ControllerIdentity, nil
	}
	tc, ok := cl.Net.Conn.(*tls.Conn)
	if !ok {
		return "", fmt.Errorf("%w: not a TLS connection", errRefused)
	}
	st := tc.ConnectionState()
	if len(st.VerifiedChains) == 0 || len(st.VerifiedChains[0]) == 0 {
		return "", fmt.Errorf("%w: no verified client certificate", errRefused)
	}
	cn := st.VerifiedChains[0][0].Subject.CommonName
	if cn == ControllerIdentity {
		return cn, nil
	}
	if err := wire.ValidateDeviceID(cn); err != nil {
		return "", fmt.Errorf("%w: certificate common name: %v", errRefused, err)
	}
	return cn, nil
}

// checkDeviceConnect checks what a device asks for in its CONNECT: its
// own client id, and a last will only on a topic it may publish to (mochi
// publishes a will without an ACL check, so a will on another device's
// topic would be a way around the ACL).
func checkDeviceConnect(identity string, pk packets.Packet) error {
	if pk.Connect.ClientIdentifier != identity {
		return fmt.Errorf("%w: certificate of device %q used with client id %q; a device must connect with its own id", errRefused, identity, pk.Connect.ClientIdentifier)
	}
	if pk.Connect.WillFlag && !Allowed(identity, pk.Connect.WillTopic, true) {
		return fmt.Errorf("%w: device %q asked for a last will on %q, which it may not publish to", errRefused, identity, pk.Connect.WillTopic)
	}
	return nil
}

func (h *accessHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	identity := string(cl.Properties.Username)
	if Allowed(identity, topic, write) {
		return true
	}
	dir := "subscribe to"
	if write {
		dir = "publish to"
	}
	h.log.Warn("mqtt access denied", "identity", identity, "client", cl.ID, "topic", topic, "op", dir)
	return false
}
