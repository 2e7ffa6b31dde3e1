package deploy

import (
	"crypto/ed25519"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/models/bundle"
	"github.com/edgefleet/edgefleet/models/modeltest"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"google.golang.org/protobuf/proto"
)

func TestCompareVersions(t *testing.T) {
	cases := []struct {
		a, b string
		want int
	}{
		{"1.0.0", "1.0.0", 0},
		{"1.0.0", "1.0.1", -1},
		{"1.10.0", "1.9.0", 1},
		{"2.0.0", "1.99.99", 1},
		{"1.0.0-rc.1", "1.0.0", -1},
		{"1.0.0-rc.2", "1.0.0-rc.10", -1},
		{"1.0.0-alpha", "1.0.0-beta", -1},
		{"1.0.0-1", "1.0.0-alpha", -1},
		{"1.0.0-alpha", "1.0.0-alpha.1", -1},
		{"junk", "0.0.0", -1},
		{"01.0.0", "0.0.1", -1}, // malformed: leading zero
		{"1.0", "0.0.1", -1},
	}
	for _, c := range cases {
		if got := CompareVersions(c.a, c.b); got != c.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", c.a, c.b, got, c.want)
		}
		if got := CompareVersions(c.b, c.a); got != -c.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", c.b, c.a, got, -c.want)
		}
	}
}

func newKey(t *testing.T) ed25519.PrivateKey {
	t.Helper()
	_, priv, err := trust.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	return priv
}

func pubOf(k ed25519.PrivateKey) ed25519.PublicKey { return k.Public().(ed25519.PublicKey) }

// signBundle returns b with a manifest.sig by keys (none: unsigned).
func signBundle(t *testing.T, b *bundle.Bundle, keys ...ed25519.PrivateKey) *bundle.Bundle {
	t.Helper()
	c := *b
	c.Signature = nil
	if len(keys) > 0 {
		var sigs []trust.Signature
		for _, k := range keys {
			sigs = append(sigs, trust.Sign(k, trust.DomainBundleManifest, c.ManifestJSON))
		}
		var err error
		if c.Signature, err = trust.EncodeSignatures(sigs); err != nil {
			t.Fatal(err)
		}
	}
	return &c
}

func encode(t *testing.T, b *bundle.Bundle) []byte {
	t.Helper()
	data, err := b.Encode()
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// directorSigned serializes ds and signs it with key (nil: unsigned).
func directorSigned(t *testing.T, key ed25519.PrivateKey, ds *pb.DesiredState) *pb.SignedDesiredState {
	t.Helper()
	raw, err := proto.MarshalOptions{Deterministic: true}.Marshal(ds)
	if err != nil {
		t.Fatal(err)
	}
	sd := &pb.SignedDesiredState{Desired: raw}
	if key != nil {
		s := trust.Sign(key, trust.DomainDesiredState, raw)
		sd.Signature, sd.KeyId = s.Sig, s.KeyID
	}
	return sd
}

func TestTrustGuardChecks(t *testing.T) {
	release, director, other := newKey(t), newKey(t), newKey(t)
	man := bundle.Manifest{Name: "m", Version: "1.0.0",
		Inputs: []bundle.TensorSpec{{Name: "x", Datatype: "FP32", Shape: []int64{1}}}, Outputs: []bundle.TensorSpec{{Name: "y", Datatype: "FP32", Shape: []int64{1}}}}
	b := modeltest.Bundle(t, man, []byte("\x00asm\x01\x00\x00\x00"))
	tampered := signBundle(t, b, release)
	tampered.ManifestJSON = []byte(strings.Replace(string(tampered.ManifestJSON), `"1.0.0"`, `"9.0.0"`, 1))
	g := &TrustGuard{Release: trust.NewKeySet(pubOf(release)), Director: trust.NewKeySet(pubOf(director)), DataDir: t.TempDir()}

	bundles := []struct {
		name string
		b    *bundle.Bundle
		want error
	}{
		{"signed", signBundle(t, b, release), nil},
		{"signed by a trusted and an unknown key", signBundle(t, b, other, release), nil},
		{"unsigned", signBundle(t, b), nil},
		{"unknown key", signBundle(t, b, other), trust.ErrUnknownKey},
		{"manifest changed after signing", tampered, trust.ErrBadSig},
	}
	for _, c := range bundles {
		t.Run("bundle "+c.name, func(t *testing.T) {
			err := g.CheckBundle(c.b)
			if c.name == "unsigned" {
				if err == nil || !strings.Contains(err.Error(), "not signed") || !strings.Contains(err.Error(), "fleet model sign") {
					t.Fatalf("unsigned bundle: %v", err)
				}
				return
			}
			if !errors.Is(err, c.want) {
				t.Fatalf("CheckBundle = %v, want %v", err, c.want)
			}
			if err != nil && (!strings.Contains(err.Error(), "bundle m@") || !strings.Contains(err.Error(), trust.KeyID(pubOf(release)))) {
				t.Fatalf("error does not name the bundle and the trusted key: %v", err)
			}
		})
	}

	ds := &pb.DesiredState{DeviceId: "dev-1", Generation: 4}
	good := directorSigned(t, director, ds)
	forged := directorSigned(t, director, ds)
	forged.Desired = append([]byte(nil), forged.Desired...)
	forged.Desired[len(forged.Desired)-1]++ // generation 5, signature of generation 4
	desired := []struct {
		name string
		sd   *pb.SignedDesiredState
		want string
	}{
		{"signed", good, ""},
		{"unsigned", directorSigned(t, nil, ds), "not signed"},
		{"unknown key", directorSigned(t, other, ds), "unknown key"},
		{"bytes changed after signing", forged, "does not verify"},
		{"release key cannot sign a desired state", directorSigned(t, release, ds), "unknown key"},
	}
	for _, c := range desired {
		t.Run("desired "+c.name, func(t *testing.T) {
			err := g.CheckDesired(c.sd)
			if c.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "--director-key") {
				t.Fatalf("CheckDesired = %v, want it to say %q and the fix", err, c.want)
			}
		})
	}

	t.Run("allow unsigned still checks signatures", func(t *testing.T) {
		lax := &TrustGuard{Release: g.Release, Director: g.Director, AllowUnsigned: true, DataDir: t.TempDir()}
		if err := lax.CheckBundle(signBundle(t, b)); err != nil {
			t.Fatalf("unsigned bundle with AllowUnsigned: %v", err)
		}
		if err := lax.CheckDesired(directorSigned(t, nil, ds)); err != nil {
			t.Fatalf("unsigned desired state with AllowUnsigned: %v", err)
		}
		if err := lax.CheckBundle(signBundle(t, b, other)); !errors.Is(err, trust.ErrUnknownKey) {
			t.Fatalf("badly signed bundle with AllowUnsigned: %v", err)
		}
		// Rollback orders are not trusted without verified desired states.
		v2 := &Ref{Name: "m", Version: "2.0.0"}
		if err := lax.CheckVersion("s", v2, Ref{Name: "m", Version: "1.0.0"}, true); err == nil || !strings.Contains(err.Error(), "not director-signed") {
			t.Fatalf("unsigned rollback below the floor: %v", err)
		}
	})
}

func TestVersionFloor(t *testing.T) {
	dir := t.TempDir()
	newGuard := func() *TrustGuard {
		return &TrustGuard{Director: trust.NewKeySet(pubOf(newKey(t))), DataDir: dir}
	}
	g := newGuard()
	ref := func(name, v string) Ref { return Ref{Name: name, Version: v} }
	run := func(r Ref) *Ref { return &r }
	steps := []struct {
		name     string
		running  *Ref
		next     Ref
		rollback bool
		wantErr  string
		floor    string
	}{
		{"first install", nil, ref("m", "1.0.0"), false, "", ""},
		{"upgrade", run(ref("m", "1.0.0")), ref("m", "1.2.0"), false, "", "1.0.0"},
		{"downgrade below running", run(ref("m", "1.2.0")), ref("m", "1.1.0"), false, "below the version floor 1.2.0", "1.2.0"},
		{"same version again", run(ref("m", "1.2.0")), ref("m", "1.2.0"), false, "", "1.2.0"},
		{"another model resets the comparison", run(ref("m", "1.2.0")), ref("other", "0.1.0"), false, "", "1.2.0"},
		{"slot emptied, old version", nil, ref("m", "1.0.0"), false, "below the version floor 1.2.0", "1.2.0"},
		{"signed rollback", run(ref("m", "1.2.0")), ref("m", "1.0.0"), true, "", "1.0.0"},
		{"after rollback, 1.1.0 is an upgrade", run(ref("m", "1.0.0")), ref("m", "1.1.0"), false, "", "1.0.0"},
	}
	for i, s := range steps {
		if i == 5 {
			g = newGuard() // a restart: the floor comes from floors.json
		}
		err := g.CheckVersion("s", s.running, s.next, s.rollback)
		if s.wantErr == "" && err != nil || s.wantErr != "" && (err == nil || !strings.Contains(err.Error(), s.wantErr)) {
			t.Fatalf("%s: CheckVersion = %v, want %q", s.name, err, s.wantErr)
		}
		floors, err := g.Floors()
		if err != nil {
			t.Fatal(err)
		}
		if got := floors["s"].Version; got != s.floor {
			t.Fatalf("%s: floor %q, want %q", s.name, got, s.floor)
		}
	}

	// A damaged floors file fails closed.
	if err := os.WriteFile(filepath.Join(dir, FloorsFile), []byte("{garbage"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := newGuard().CheckVersion("s", nil, ref("m", "9.0.0"), false); err == nil || !strings.Contains(err.Error(), "delete it") {
		t.Fatalf("damaged floors file: %v", err)
	}
}

func FuzzDecodeFloors(f *testing.F) {
	f.Add([]byte(`{"default":{"model":"m","version":"1.2.0"}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"a":{"model":"","version":"x"}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		floors, err := DecodeFloors(b)
		if err != nil {
			return
		}
		for slot, fl := range floors {
			if !slotRE.MatchString(slot) || !validVersion(fl.Version) {
				t.Fatalf("accepted %q: %+v", slot, fl)
			}
		}
	})
}

func FuzzParseGeneration(f *testing.F) {
	f.Add([]byte("42\n"))
	f.Add([]byte(""))
	f.Add([]byte("18446744073709551616"))
	f.Fuzz(func(t *testing.T, b []byte) {
		g, err := parseGeneration(b)
		if err == nil && strings.TrimSpace(string(b)) != strconv.FormatUint(g, 10) && !strings.HasPrefix(strings.TrimSpace(string(b)), "+") &&
			!strings.HasPrefix(strings.TrimSpace(string(b)), "0") {
			t.Fatalf("%q parsed as %d", b, g)
		}
	})
}

// FuzzCheckDesired: no forged document verifies, and nothing panics.
func FuzzCheckDesired(f *testing.F) {
	_, priv, err := trust.GenerateKey()
	if err != nil {
		f.Fatal(err)
	}
	pub := priv.Public().(ed25519.PublicKey)
	g := &TrustGuard{Director: trust.NewKeySet(pub), DataDir: f.TempDir()}
	good := []byte("\x0a\x05dev-1\x10\x01")
	sig := trust.Sign(priv, trust.DomainDesiredState, good)
	f.Add(good, sig.Sig, sig.KeyID)
	f.Add([]byte{}, []byte{}, "")
	f.Add(good, make([]byte, ed25519.SignatureSize), sig.KeyID)
	f.Fuzz(func(t *testing.T, desired, signature []byte, keyID string) {
		err := g.CheckDesired(&pb.SignedDesiredState{Desired: desired, Signature: signature, KeyId: keyID})
		valid := keyID == sig.KeyID && ed25519.Verify(pub, append([]byte(trust.DomainDesiredState+"\x00"), desired...), signature)
		if (err == nil) != valid {
			t.Fatalf("CheckDesired = %v for a signature that verifies: %v", err, valid)
		}
	})
}

// TestSignedDeployment runs the manager with a TrustGuard against real
// signed bundles and desired states: every forgery is refused, reported,
// and the running model keeps answering.
func TestSignedDeployment(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	release, director, other := newKey(t), newKey(t), newKey(t)
	var clock atomic.Int64
	clock.Store(time.Now().UnixMilli())
	now := func() time.Time { return time.UnixMilli(clock.Load()) }
	opts := func(o *Options) {
		o.Now = now
		o.Guard = &TrustGuard{Release: trust.NewKeySet(pubOf(release)), Director: trust.NewKeySet(pubOf(director)), DataDir: f.dir}
	}
	state := func(gen uint64, slots ...*pb.SlotAssignment) *pb.DesiredState {
		return &pb.DesiredState{DeviceId: "dev-1", Generation: gen, IssuedAtUnixMs: clock.Load(),
			ExpiresAtUnixMs: clock.Load() + time.Hour.Milliseconds(), Slots: slots}
	}

	b1 := modeltest.ExampleBundle(t, "grid-anomaly", "1.0.0")
	b2 := modeltest.ExampleBundle(t, "grid-anomaly", "1.1.0")
	v1 := f.publish("default", "grid-anomaly", "1.0.0", encode(t, signBundle(t, b1, release)))
	v2 := f.publish("default", "grid-anomaly", "1.1.0", encode(t, signBundle(t, b2, release)))

	m, ev, stop := f.startWith(opts)
	gen1 := directorSigned(t, director, state(1, v1))
	m.Offer(gen1)
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, 1)

	// Bundles: each refused with a FAILED event, 1.0.0 keeps answering.
	tamperedModule := signBundle(t, b2, release)
	tamperedModule.Module = append([]byte(nil), tamperedModule.Module...)
	tamperedModule.Module[len(tamperedModule.Module)/2] ^= 0xff
	forgedMan := b2.Manifest
	forgedMan.Version = "1.3.0"
	tamperedManifest := modeltest.Bundle(t, forgedMan, b2.Module)
	tamperedManifest.Signature = signBundle(t, b2, release).Signature // 1.1.0's signature on 1.3.0's manifest

	gen := uint64(1)
	bad := []struct {
		name   string
		assign *pb.SlotAssignment
		want   string
	}{
		{"missing signature", f.publish("default", "grid-anomaly", "1.1.0", encode(t, signBundle(t, b2))), "is not signed"},
		{"wrong key", f.publish("default", "grid-anomaly", "1.1.0", encode(t, signBundle(t, b2, other))), "unknown key"},
		{"tampered manifest", f.publish("default", "grid-anomaly", "1.3.0", encode(t, tamperedManifest)), "does not verify"},
		{"tampered module", f.publish("default", "grid-anomaly", "1.1.0", encode(t, tamperedModule)), "module was changed"},
	}
	for _, c := range bad {
		gen++
		m.Offer(directorSigned(t, director, state(gen, c.assign)))
		if d := ev.waitFor(t, pb.EventKind_EVENT_KIND_FAILED, gen).GetDetail(); !strings.Contains(d, c.want) {
			t.Fatalf("%s: FAILED detail %q, want %q", c.name, d, c.want)
		}
		if v, _ := infer(t, m, "grid-anomaly"); v != "1.0.0" {
			t.Fatalf("%s: %s answers", c.name, v)
		}
	}

	// Desired states: forged, foreign, expired, from the future, replayed.
	gen++
	good := directorSigned(t, director, state(gen, v2))
	m.Offer(good)
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, gen)
	accepted := gen

	foreign := state(gen+1, v1)
	foreign.DeviceId = "dev-9"
	expired := state(gen+1, v1)
	expired.ExpiresAtUnixMs = clock.Load() - (DefaultClockSkew + time.Minute).Milliseconds()
	future := state(gen+1, v1)
	future.IssuedAtUnixMs = clock.Load() + (DefaultClockSkew + time.Minute).Milliseconds()
	refusals := []struct {
		name string
		sd   *pb.SignedDesiredState
		want string
	}{
		{"unsigned", directorSigned(t, nil, state(gen+1, v1)), "not signed"},
		{"wrong key", directorSigned(t, other, state(gen+1, v1)), "unknown key"},
		{"another device's", directorSigned(t, director, foreign), `for device "dev-9"`},
		{"expired", directorSigned(t, director, expired), "expired"},
		{"issued in the future", directorSigned(t, director, future), "fix the device clock"},
		{"replayed", gen1, "refusing it as a replay"},
	}
	for _, c := range refusals {
		before := len(ev.all())
		m.Offer(c.sd)
		e := waitNewEvent(t, ev, before, pb.EventKind_EVENT_KIND_REFUSED)
		if !strings.Contains(e.GetDetail(), c.want) {
			t.Fatalf("%s: REFUSED detail %q, want %q", c.name, e.GetDetail(), c.want)
		}
		if m.Generation() != accepted {
			t.Fatalf("%s: generation %d, want %d", c.name, m.Generation(), accepted)
		}
		if v, _ := infer(t, m, "grid-anomaly"); v != "1.1.0" {
			t.Fatalf("%s: %s answers", c.name, v)
		}
	}

	// Clock skew within bounds is tolerated both ways.
	gen++
	skewed := state(gen, v2)
	skewed.IssuedAtUnixMs = clock.Load() + (DefaultClockSkew - time.Minute).Milliseconds()
	skewed.ExpiresAtUnixMs = clock.Load() - (DefaultClockSkew - time.Minute).Milliseconds()
	m.Offer(directorSigned(t, director, skewed))
	waitGeneration(t, m, gen)
	accepted = gen

	// A downgrade without a rollback order is refused...
	gen++
	m.Offer(directorSigned(t, director, state(gen, v1)))
	if d := ev.waitFor(t, pb.EventKind_EVENT_KIND_FAILED, gen).GetDetail(); !strings.Contains(d, "below the version floor 1.1.0") {
		t.Fatalf("downgrade: FAILED detail %q", d)
	}
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.1.0" {
		t.Fatalf("downgrade applied: %s answers", v)
	}
	accepted = gen

	// ...and the replay is refused after a restart too, while the state
	// accepted last (the broker's retained copy) is not a replay.
	stop()
	m, ev, _ = f.startWith(opts)
	if m.Generation() != accepted {
		t.Fatalf("generation after restart %d, want %d", m.Generation(), accepted)
	}
	before := len(ev.all())
	m.Offer(gen1)
	if d := waitNewEvent(t, ev, before, pb.EventKind_EVENT_KIND_REFUSED).GetDetail(); !strings.Contains(d, "replay") {
		t.Fatalf("replay after restart: %q", d)
	}
	// A signed rollback order is applied.
	gen++
	rb := proto.Clone(v1).(*pb.SlotAssignment)
	rb.Rollback = true
	m.Offer(directorSigned(t, director, state(gen, rb)))
	ev.waitFor(t, pb.EventKind_EVENT_KIND_ACTIVATED, gen)
	if v, _ := infer(t, m, "grid-anomaly"); v != "1.0.0" {
		t.Fatalf("signed rollback not applied: %s answers", v)
	}
}

// TestGenerationSurvivesLostDesiredFile: the generation file keeps replays
// refused when desired.pb is gone.
func TestGenerationSurvivesLostDesiredFile(t *testing.T) {
	f := newFixture(t)
	director := newKey(t)
	opts := func(o *Options) {
		o.Guard = &TrustGuard{Director: trust.NewKeySet(pubOf(director)), DataDir: f.dir}
	}
	m, _, stop := f.startWith(opts)
	old := directorSigned(t, director, &pb.DesiredState{DeviceId: "dev-1", Generation: 3})
	m.Offer(old)
	waitGeneration(t, m, 3)
	m.Offer(directorSigned(t, director, &pb.DesiredState{DeviceId: "dev-1", Generation: 7}))
	waitGeneration(t, m, 7)
	stop()
	if err := os.Remove(filepath.Join(f.dir, DesiredFile)); err != nil {
		t.Fatal(err)
	}
	m, ev, _ := f.startWith(opts)
	if m.Generation() != 7 {
		t.Fatalf("generation after losing desired.pb: %d, want 7", m.Generation())
	}
	m.Offer(old)
	if d := ev.waitFor(t, pb.EventKind_EVENT_KIND_REFUSED, 3).GetDetail(); !strings.Contains(d, "replay") {
		t.Fatalf("REFUSED detail %q", d)
	}
}

func waitGeneration(t *testing.T, m *Manager, gen uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for m.Generation() != gen {
		if time.Now().After(deadline) {
			t.Fatalf("generation %d, want %d", m.Generation(), gen)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitNewEvent waits for an event of kind after the first skip events.
func waitNewEvent(t *testing.T, ev *events, skip int, kind pb.EventKind) *pb.Event {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		all := ev.all()
		for _, e := range all[min(skip, len(all)):] {
			if e.GetKind() == kind {
				return e
			}
		}
		select {
		case <-ev.notify:
		case <-deadline:
			t.Fatalf("no new %s event; got %v", kind, ev.all()[skip:])
		}
	}
}
