package director

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/controller/internal/durable"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// Key rotation. The controller keeps every key announcement, its own
// (director) and the operators' (release, signed offline and pushed through
// the API), in DATA/keys/announcements.pb, oldest first, and publishes the
// whole chain retained on every device's ef/v1/dev/{id}/keys topic: after a
// rotation to all known devices, and to a device at each hello (the
// embedded broker keeps only desired states across restarts). An agent
// applies what it has not applied yet, each announcement verified with the
// keys it trusts at that point (agent/deploy.TrustGuard.ApplyKeys).
//
// A director rotation, in the order a power cut can interrupt it:
//
//  1. the new key is written to director.key.next (synced);
//  2. the chain with the new announcement, signed by the current key, is
//     written to announcements.pb (atomically, synced);
//  3. director.key.next replaces director.key, director.pub is rewritten;
//  4. desired states are signed with the new key from then on, and the
//     chain is published.
//
// At start LoadOrCreateKey finishes a rotation whose announcement was
// saved (step 3) and drops a director.key.next whose announcement was not.

// Files under DATA/keys.
const (
	AnnouncementsFile = "announcements.pb"
	nextKeyFile       = PrivateKeyFile + ".next"
)

// DefaultOverlap is how long the previous director key stays trusted after
// a rotation: as long as a desired state it signed stays valid, so a device
// that was offline during the rotation still verifies the state waiting
// for it.
const DefaultOverlap = DefaultExpiry

// keyring is the director's key and the announcement chain. Its mutex
// orders rotations and announcement pushes; the key itself is swapped
// under the director's pubMu, so no document is half signed by either.
type keyring struct {
	mu      sync.Mutex
	dir     string // DATA/keys; empty: rotation is off
	devices func(ctx context.Context) ([]string, error)
	key     ed25519.PrivateKey
	chain   *pb.KeyAnnouncements
}

// Announcement describes one key announcement.
type Announcement struct {
	Role             string
	Sequence         uint64
	KeyID            string
	SignedBy         string
	IssuedAt         time.Time
	RetirePreviousAt time.Time // zero: at once
}

// KeysInfo is what GET /v1/keys shows: the director key in use and every
// announcement, oldest first.
type KeysInfo struct {
	DirectorKeyID     string
	DirectorPublicKey []byte // PEM
	Announcements     []Announcement
}

// EnableRotation turns key rotation on: it reads the announcement chain
// from dataDir/keys and remembers how to list every device to publish it
// to. The controller calls it once after New.
func (d *Director) EnableRotation(dataDir string, devices func(ctx context.Context) ([]string, error)) error {
	dir := filepath.Join(dataDir, KeysDir)
	chain, err := readChain(dir)
	if err != nil {
		return err
	}
	d.keys.mu.Lock()
	defer d.keys.mu.Unlock()
	d.keys.dir, d.keys.devices, d.keys.chain = dir, devices, chain
	return nil
}

func readChain(dir string) (*pb.KeyAnnouncements, error) {
	path := filepath.Join(dir, AnnouncementsFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return &pb.KeyAnnouncements{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("key announcements: %w", err)
	}
	chain, err := trust.DecodeAnnouncements(b)
	if err != nil {
		return nil, fmt.Errorf("key announcements %s: %w; restore it from a backup (agents need the chain to trust rotated keys)", path, err)
	}
	return chain, nil
}

// signingKey is the key desired states are signed with now; the caller
// holds pubMu.
func (d *Director) signingKey() ed25519.PrivateKey {
	if d.keys.key != nil {
		return d.keys.key
	}
	return d.opts.Key
}

// lastSequence returns the last sequence of role in the chain.
func lastSequence(chain *pb.KeyAnnouncements, role pb.KeyRole) (uint64, []*pb.KeyAnnouncement) {
	var seq uint64
	var of []*pb.KeyAnnouncement
	for _, s := range chain.GetAnnouncements() {
		a, err := trust.DecodeAnnouncement(s)
		if err != nil || a.GetRole() != role {
			continue
		}
		of = append(of, a)
		seq = max(seq, a.GetSequence())
	}
	return seq, of
}

// RotateDirectorKey makes a new director key, announces it signed by the
// current one with the previous key trusted for overlap more (zero:
// DefaultOverlap; negative: retired at once, for a compromised key), saves
// both, signs every desired state with it from now on and publishes the
// chain to every device.
func (d *Director) RotateDirectorKey(ctx context.Context, overlap time.Duration) (Announcement, error) {
	d.keys.mu.Lock()
	defer d.keys.mu.Unlock()
	if d.keys.dir == "" {
		return Announcement{}, errors.New("key rotation is not enabled on this controller")
	}
	if len(d.keys.chain.GetAnnouncements()) >= trust.MaxAnnouncements {
		return Announcement{}, fmt.Errorf("the key announcement chain holds %d announcements, the most agents read; re-provision agents with the current keys and start a new chain", trust.MaxAnnouncements)
	}
	d.pubMu.Lock()
	defer d.pubMu.Unlock()
	old := d.signingKey()
	if old == nil {
		return Announcement{}, errors.New("this controller has no director key to sign the announcement with")
	}
	pub, priv, err := trust.GenerateKey()
	if err != nil {
		return Announcement{}, err
	}
	now := d.opts.Now()
	var retire time.Time
	switch {
	case overlap == 0:
		retire = now.Add(DefaultOverlap)
	case overlap > 0:
		retire = now.Add(overlap)
	}
	seq, _ := lastSequence(d.keys.chain, pb.KeyRole_KEY_ROLE_DIRECTOR)
	signed, err := trust.SignAnnouncement(old, trust.NewAnnouncement(pb.KeyRole_KEY_ROLE_DIRECTOR, pub, seq+1, now, retire))
	if err != nil {
		return Announcement{}, err
	}
	pem, err := trust.MarshalPrivateKey(priv)
	if err != nil {
		return Announcement{}, err
	}
	next := filepath.Join(d.keys.dir, nextKeyFile)
	if err := writeSynced(next, pem, privateKeyMode); err != nil {
		return Announcement{}, fmt.Errorf("new director key: %w", err)
	}
	chain := &pb.KeyAnnouncements{Announcements: append(append([]*pb.SignedKeyAnnouncement(nil), d.keys.chain.GetAnnouncements()...), signed)}
	if err := d.saveChain(chain); err != nil {
		os.Remove(next)
		return Announcement{}, err
	}
	// From here the rotation is decided: a crash is finished at start.
	if err := finishRotation(d.keys.dir); err != nil {
		return Announcement{}, err
	}
	d.keys.chain, d.keys.key = chain, priv
	d.log.Warn("director key rotated", "key", trust.KeyID(pub), "previous", trust.KeyID(old.Public().(ed25519.PublicKey)), "sequence", seq+1, "retire_previous_at", retire)
	d.publishChainLocked(ctx, chain)
	return describe(signed), nil
}

// AddAnnouncement takes a release key announcement signed offline (`fleet
// keys rotate-release`), checks that it continues the chain, saves it and
// publishes the chain. Director announcements are made only by
// RotateDirectorKey.
func (d *Director) AddAnnouncement(ctx context.Context, s *pb.SignedKeyAnnouncement) (Announcement, error) {
	a, err := trust.DecodeAnnouncement(s)
	if err != nil {
		return Announcement{}, err
	}
	if a.GetRole() != pb.KeyRole_KEY_ROLE_RELEASE {
		return Announcement{}, errors.New("only release key announcements are pushed; the controller announces its director key itself (POST /v1/keys/director/rotate)")
	}
	d.keys.mu.Lock()
	defer d.keys.mu.Unlock()
	if d.keys.dir == "" {
		return Announcement{}, errors.New("key rotation is not enabled on this controller")
	}
	if len(d.keys.chain.GetAnnouncements()) >= trust.MaxAnnouncements {
		return Announcement{}, fmt.Errorf("the key announcement chain holds %d announcements, the most agents read", trust.MaxAnnouncements)
	}
	seq, prev := lastSequence(d.keys.chain, pb.KeyRole_KEY_ROLE_RELEASE)
	if a.GetSequence() != seq+1 {
		return Announcement{}, fmt.Errorf("release key announcement has sequence %d, the next one is %d: sign it again with `fleet keys rotate-release --sequence %d`", a.GetSequence(), seq+1, seq+1)
	}
	// The controller does not hold the release key, but it knows every
	// release key announced so far: after the first announcement, the
	// signer must be one of them, as agents will check.
	if len(prev) > 0 {
		ks := trust.NewKeySet()
		for _, p := range prev {
			ks.Add(trust.PublicKey(p))
		}
		if _, err := trust.VerifyAnnouncement(ks, s); err != nil {
			return Announcement{}, fmt.Errorf("%w; sign it with the current release key (the one announced last)", err)
		}
	}
	chain := &pb.KeyAnnouncements{Announcements: append(append([]*pb.SignedKeyAnnouncement(nil), d.keys.chain.GetAnnouncements()...), s)}
	if err := d.saveChain(chain); err != nil {
		return Announcement{}, err
	}
	d.keys.chain = chain
	d.log.Warn("release key announced", "key", a.GetKeyId(), "signed_by", s.GetKeyId(), "sequence", a.GetSequence())
	d.publishChainLocked(ctx, chain)
	return describe(s), nil
}

// Keys describes the director key in use and the announcement chain.
func (d *Director) Keys() (KeysInfo, error) {
	d.keys.mu.Lock()
	chain := d.keys.chain
	d.keys.mu.Unlock()
	d.pubMu.Lock()
	key := d.signingKey()
	d.pubMu.Unlock()
	var info KeysInfo
	if key != nil {
		pub := key.Public().(ed25519.PublicKey)
		pem, err := trust.MarshalPublicKey(pub)
		if err != nil {
			return info, err
		}
		info.DirectorKeyID, info.DirectorPublicKey = trust.KeyID(pub), pem
	}
	for _, s := range chain.GetAnnouncements() {
		info.Announcements = append(info.Announcements, describe(s))
	}
	return info, nil
}

// PublishKeys publishes the announcement chain to device id, if there is
// one. The controller calls it at each hello.
func (d *Director) PublishKeys(id string) {
	d.keys.mu.Lock()
	chain := d.keys.chain
	d.keys.mu.Unlock()
	if len(chain.GetAnnouncements()) == 0 {
		return
	}
	d.publishKeys(id, chain, nil)
}

func (d *Director) publishChainLocked(ctx context.Context, chain *pb.KeyAnnouncements) {
	if d.keys.devices == nil {
		return
	}
	ids, err := d.keys.devices(ctx)
	if err != nil {
		// Devices still get the chain at their next hello.
		d.log.Error("list devices to publish the key announcements to", "err", err)
		return
	}
	for _, id := range ids {
		d.publishKeys(id, chain, nil)
	}
}

func (d *Director) publishKeys(id string, chain *pb.KeyAnnouncements, done func(error)) {
	payload, err := wire.Seal(id, d.opts.Now(), chain)
	if err == nil {
		d.opts.Publisher.PublishAsync(wire.Topic(id, wire.KindKeys), payload, true, func(err error) {
			if err != nil {
				d.log.Warn("key announcements not published; sent again at the device's next hello", "device", id, "err", err)
			}
			if done != nil {
				done(err)
			}
		})
		return
	}
	d.log.Error("seal key announcements", "device", id, "err", err)
	if done != nil {
		done(err)
	}
}

func (d *Director) saveChain(chain *pb.KeyAnnouncements) error {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(chain)
	if err != nil {
		return err
	}
	path := filepath.Join(d.keys.dir, AnnouncementsFile)
	tmp := path + ".tmp"
	if err := writeSynced(tmp, b, publicKeyMode); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("key announcements %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("key announcements %s: %w", path, err)
	}
	durable.SyncDir(d.keys.dir)
	return nil
}

func describe(s *pb.SignedKeyAnnouncement) Announcement {
	a, err := trust.DecodeAnnouncement(s)
	if err != nil {
		return Announcement{Role: "malformed", SignedBy: s.GetKeyId()}
	}
	out := Announcement{Role: trust.RoleName(a.GetRole()), Sequence: a.GetSequence(), KeyID: a.GetKeyId(), SignedBy: s.GetKeyId(),
		IssuedAt: time.UnixMilli(a.GetIssuedAtUnixMs()).UTC()}
	if ms := a.GetRetirePreviousAtUnixMs(); ms != 0 {
		out.RetirePreviousAt = time.UnixMilli(ms).UTC()
	}
	return out
}

// recoverRotation finishes or drops a director rotation a crash
// interrupted (see the order above).
func recoverRotation(dir string) error {
	next := filepath.Join(dir, nextKeyFile)
	priv, err := trust.ReadPrivateKey(next)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	chain, cerr := readChain(dir)
	if cerr != nil {
		return cerr
	}
	if err == nil {
		_, announced := lastSequence(chain, pb.KeyRole_KEY_ROLE_DIRECTOR)
		id := trust.KeyID(priv.Public().(ed25519.PublicKey))
		if n := len(announced); n > 0 && announced[n-1].GetKeyId() == id {
			return finishRotation(dir)
		}
	}
	// Never announced (or unreadable): agents would not trust it.
	if err := os.Remove(next); err != nil {
		return fmt.Errorf("director key: drop the unannounced %s: %w", next, err)
	}
	return nil
}

// finishRotation makes director.key.next the director key and rewrites
// director.pub from it.
func finishRotation(dir string) error {
	next, cur := filepath.Join(dir, nextKeyFile), filepath.Join(dir, PrivateKeyFile)
	if err := os.Rename(next, cur); err != nil {
		return fmt.Errorf("director key rotation: %w; move %s to %s by hand", err, next, cur)
	}
	durable.SyncDir(dir)
	priv, err := trust.ReadPrivateKey(cur)
	if err != nil {
		return err
	}
	pem, err := trust.MarshalPublicKey(priv.Public().(ed25519.PublicKey))
	if err != nil {
		return err
	}
	pubPath := filepath.Join(dir, PublicKeyFile)
	tmp := pubPath + ".tmp"
	if err := writeSynced(tmp, pem, publicKeyMode); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("director public key %s: %w", pubPath, err)
	}
	if err := os.Rename(tmp, pubPath); err != nil {
		return fmt.Errorf("director public key %s: %w", pubPath, err)
	}
	durable.SyncDir(dir)
	return nil
}

func writeSynced(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
