package director

import (
	"context"
	"crypto/ed25519"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// sentMessages records what the director hands to the broker (the MQTT
// network is the process edge; controller and e2e tests use a real one).
type sentMessages struct {
	mu   sync.Mutex
	msgs map[string][]byte
}

func (s *sentMessages) PublishAsync(topic string, payload []byte, _ bool, done func(error)) {
	s.mu.Lock()
	if s.msgs == nil {
		s.msgs = map[string][]byte{}
	}
	s.msgs[topic] = payload
	s.mu.Unlock()
	done(nil)
}

func (s *sentMessages) chain(t *testing.T, id string) *pb.KeyAnnouncements {
	t.Helper()
	s.mu.Lock()
	b := s.msgs[wire.Topic(id, wire.KindKeys)]
	s.mu.Unlock()
	env, err := wire.Open(wire.Topic(id, wire.KindKeys), b)
	if err != nil {
		t.Fatalf("keys of %s: %v", id, err)
	}
	return env.GetKeys()
}

func TestRotateDirectorKey(t *testing.T) {
	data := t.TempDir()
	old, _, err := LoadOrCreateKey(data)
	if err != nil {
		t.Fatal(err)
	}
	now := time.UnixMilli(1_800_000_000_000)
	pub := &sentMessages{}
	d := New(Options{Key: old, Publisher: pub, Now: func() time.Time { return now }})
	if err := d.EnableRotation(data, func(context.Context) ([]string, error) { return []string{"dev-1", "dev-2"}, nil }); err != nil {
		t.Fatal(err)
	}
	oldID := trust.KeyID(old.Public().(ed25519.PublicKey))

	a, err := d.RotateDirectorKey(t.Context(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if a.Role != "director" || a.Sequence != 1 || a.SignedBy != oldID || a.KeyID == oldID || !a.RetirePreviousAt.Equal(now.Add(time.Hour).UTC()) {
		t.Fatalf("announcement %+v", a)
	}
	// The chain went to every device and verifies with the old key.
	for _, id := range []string{"dev-1", "dev-2"} {
		c := pub.chain(t, id)
		if len(c.GetAnnouncements()) != 1 {
			t.Fatalf("%s got %d announcements", id, len(c.GetAnnouncements()))
		}
		got, err := trust.VerifyAnnouncement(trust.NewKeySet(old.Public().(ed25519.PublicKey)), c.GetAnnouncements()[0])
		if err != nil || got.GetKeyId() != a.KeyID {
			t.Fatalf("%s: %v", id, err)
		}
	}
	// Desired states are now signed with the new key.
	ds := &store.Desired{DeviceID: "dev-1", Generation: 1, IssuedAt: now}
	if err := d.build(ds); err != nil {
		t.Fatal(err)
	}
	var sd pb.SignedDesiredState
	if err := proto.Unmarshal(ds.Doc, &sd); err != nil || sd.GetKeyId() != a.KeyID {
		t.Fatalf("signed by %q, want %q (%v)", sd.GetKeyId(), a.KeyID, err)
	}
	// The new key is on disk: a restarted controller signs with it, and
	// director.pub is its public half.
	again, _, err := LoadOrCreateKey(data)
	if err != nil || trust.KeyID(again.Public().(ed25519.PublicKey)) != a.KeyID {
		t.Fatalf("after restart: %v", err)
	}
	if p, err := trust.ReadPublicKey(filepath.Join(data, KeysDir, PublicKeyFile)); err != nil || trust.KeyID(p) != a.KeyID {
		t.Fatalf("director.pub: %v", err)
	}

	// A second rotation is signed by the first new key; a restarted
	// director lists both.
	b, err := d.RotateDirectorKey(t.Context(), -1)
	if err != nil || b.Sequence != 2 || b.SignedBy != a.KeyID || !b.RetirePreviousAt.IsZero() {
		t.Fatalf("second rotation %+v, %v", b, err)
	}
	d2 := New(Options{Key: again, Publisher: pub})
	if err := d2.EnableRotation(data, nil); err != nil {
		t.Fatal(err)
	}
	info, err := d2.Keys()
	if err != nil || len(info.Announcements) != 2 || info.Announcements[1].KeyID != b.KeyID {
		t.Fatalf("keys %+v, %v", info, err)
	}
	d2.PublishKeys("dev-3")
	if n := len(pub.chain(t, "dev-3").GetAnnouncements()); n != 2 {
		t.Fatalf("hello publish carried %d announcements", n)
	}
}

func TestRecoverRotation(t *testing.T) {
	data := t.TempDir()
	old, _, err := LoadOrCreateKey(data)
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(data, KeysDir)
	_, next, _ := trust.GenerateKey()
	pem, _ := trust.MarshalPrivateKey(next)

	// Crash before the announcement was saved: the next key is dropped.
	if err := os.WriteFile(filepath.Join(dir, nextKeyFile), pem, 0o600); err != nil {
		t.Fatal(err)
	}
	got, _, err := LoadOrCreateKey(data)
	if err != nil || !got.Equal(old) {
		t.Fatalf("unannounced next key: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, nextKeyFile)); !os.IsNotExist(err) {
		t.Fatalf("director.key.next kept: %v", err)
	}

	// Crash after it: the rotation is finished.
	if err := os.WriteFile(filepath.Join(dir, nextKeyFile), pem, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := trust.SignAnnouncement(old, trust.NewAnnouncement(pb.KeyRole_KEY_ROLE_DIRECTOR, next.Public().(ed25519.PublicKey), 1, time.Now(), time.Time{}))
	if err != nil {
		t.Fatal(err)
	}
	d := New(Options{Key: old})
	d.keys.dir = dir
	if err := d.saveChain(&pb.KeyAnnouncements{Announcements: []*pb.SignedKeyAnnouncement{s}}); err != nil {
		t.Fatal(err)
	}
	got, _, err = LoadOrCreateKey(data)
	if err != nil || !got.Equal(next) {
		t.Fatalf("announced next key not taken: %v", err)
	}
}

func TestAddReleaseAnnouncement(t *testing.T) {
	data := t.TempDir()
	dirKey, _, _ := LoadOrCreateKey(data)
	pub := &sentMessages{}
	d := New(Options{Key: dirKey, Publisher: pub})
	if err := d.EnableRotation(data, func(context.Context) ([]string, error) { return []string{"dev-1"}, nil }); err != nil {
		t.Fatal(err)
	}
	_, r0, _ := trust.GenerateKey()
	r1pub, r1, _ := trust.GenerateKey()
	r2pub, _, _ := trust.GenerateKey()
	sign := func(k ed25519.PrivateKey, role pb.KeyRole, p ed25519.PublicKey, seq uint64) *pb.SignedKeyAnnouncement {
		s, err := trust.SignAnnouncement(k, trust.NewAnnouncement(role, p, seq, time.Now(), time.Time{}))
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	for _, c := range []struct {
		name string
		s    *pb.SignedKeyAnnouncement
		want string
	}{
		{"director role", sign(r0, pb.KeyRole_KEY_ROLE_DIRECTOR, r1pub, 1), "only release key announcements"},
		{"sequence gap", sign(r0, pb.KeyRole_KEY_ROLE_RELEASE, r1pub, 2), "the next one is 1"},
	} {
		if _, err := d.AddAnnouncement(t.Context(), c.s); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	if _, err := d.AddAnnouncement(t.Context(), sign(r0, pb.KeyRole_KEY_ROLE_RELEASE, r1pub, 1)); err != nil {
		t.Fatal(err)
	}
	// The next one must be signed by the key announced last.
	if _, err := d.AddAnnouncement(t.Context(), sign(r0, pb.KeyRole_KEY_ROLE_RELEASE, r2pub, 2)); err == nil {
		t.Fatal("announcement by a key never announced accepted")
	}
	if _, err := d.AddAnnouncement(t.Context(), sign(r1, pb.KeyRole_KEY_ROLE_RELEASE, r2pub, 2)); err != nil {
		t.Fatal(err)
	}
	if n := len(pub.chain(t, "dev-1").GetAnnouncements()); n != 2 {
		t.Fatalf("device got %d announcements", n)
	}
}
