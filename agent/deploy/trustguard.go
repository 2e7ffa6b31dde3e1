package deploy

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/edgefleet/edgefleet/agent/internal/durable"
	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"google.golang.org/protobuf/proto"
)

// FloorsFile is the file in the data directory that holds the version
// floor of each slot.
const FloorsFile = "floors.json"

// maxFloorsFile caps floors.json: one small record per slot.
const maxFloorsFile = 64 << 10

// TrustGuard is the Guard of a production agent. It checks:
//
//   - bundles: manifest.sig must hold a valid signature over manifest.json
//     (which pins the module's SHA-256, checked by bundle.Decode) by one of
//     the release keys;
//   - desired states: SignedDesiredState.signature must be a valid
//     signature over the exact desired bytes by one of the director keys;
//   - versions: a slot never goes below its version floor, the highest
//     version of the same model that ran in it, unless the assignment is
//     a rollback order inside a director-signed desired state. A signed
//     rollback lowers the floor to the version it orders.
//
// Release and Director are the configured keys; ApplyKeys changes the
// trusted sets from key announcements (DATA/trust.json), and KeySet
// returns the sets in force. A nil key set with no announcement for its
// role leaves that check off (the agent starts so only with
// --allow-unsigned). AllowUnsigned accepts unsigned bundles and desired
// states with a warning, for a fleet in transition; a present signature
// is still checked, and rollback orders are then not trusted to cross
// the floor.
type TrustGuard struct {
	Release       *trust.KeySet
	Director      *trust.KeySet
	AllowUnsigned bool
	// DataDir holds floors.json and trust.json.
	DataDir string
	Logger  *slog.Logger
	// Now is the clock that retires keys after an announcement's overlap
	// window; nil means time.Now.
	Now func() time.Time

	mu     sync.Mutex
	floors map[string]Floor // nil until loaded
	keys   *keyState        // nil until loaded
	// pending is the last desired state refused for an unknown signer:
	// it is offered again once an announcement brings new director keys.
	pending *pb.SignedDesiredState
	// refused remembers announcements already refused (by signature), so
	// the retained chain, redelivered at every reconnect, is reported once.
	refused map[string]bool
}

// Floor is the lowest version of Model a slot may install without a signed
// rollback order.
type Floor struct {
	Model   string `json:"model"`
	Version string `json:"version"`
}

func (g *TrustGuard) log() *slog.Logger {
	if g.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return g.Logger
}

// CheckBundle verifies the release signature of b's manifest.
func (g *TrustGuard) CheckBundle(b *bundle.Bundle) error {
	release, err := g.KeySet(pb.KeyRole_KEY_ROLE_RELEASE)
	if err != nil {
		return err
	}
	if release == nil {
		return nil
	}
	id := fmt.Sprintf("bundle %s@%s (sha256:%s)", b.Manifest.Name, b.Manifest.Version, b.Digest)
	if len(b.Signature) == 0 {
		if g.AllowUnsigned {
			g.log().Warn("ACCEPTING AN UNSIGNED BUNDLE (--allow-unsigned)", "model", b.Manifest.Name, "version", b.Manifest.Version)
			return nil
		}
		return fmt.Errorf("%s is not signed (no %s); trusted release keys are %s: sign it with `fleet model sign` and upload it again",
			id, bundle.SignatureName, strings.Join(release.IDs(), ","))
	}
	sigs, err := trust.DecodeSignatures(b.Signature)
	if err != nil {
		return fmt.Errorf("%s: %s: %w; sign it again with `fleet model sign`", id, bundle.SignatureName, err)
	}
	if err := release.Verify(trust.DomainBundleManifest, b.ManifestJSON, sigs); err != nil {
		return fmt.Errorf("%s refused: %w; sign it with a release key this agent trusts (--release-key), or add the signer's public key to the agent", id, err)
	}
	return nil
}

// CheckDesired verifies the director signature over sd's desired bytes.
func (g *TrustGuard) CheckDesired(sd *pb.SignedDesiredState) error {
	director, err := g.KeySet(pb.KeyRole_KEY_ROLE_DIRECTOR)
	if err != nil {
		return err
	}
	if director == nil {
		return nil
	}
	if len(sd.GetSignature()) == 0 {
		if g.AllowUnsigned {
			g.log().Warn("ACCEPTING AN UNSIGNED DESIRED STATE (--allow-unsigned)")
			return nil
		}
		return fmt.Errorf("desired state is not signed; trusted director keys are %s: the controller must sign it (check that it has DATA/keys/director.key and that this agent has its director.pub as --director-key)",
			strings.Join(director.IDs(), ","))
	}
	sig := trust.Signature{KeyID: sd.GetKeyId(), Sig: sd.GetSignature()}
	err = director.Verify(trust.DomainDesiredState, sd.GetDesired(), []trust.Signature{sig})
	if errors.Is(err, trust.ErrUnknownKey) {
		if g.acceptedBefore(sd) {
			// The broker redelivers the accepted state at every reconnect;
			// its signer may have been retired since. It is not a new
			// instruction, so the manager may recognise it as the same.
			return nil
		}
		g.mu.Lock()
		g.pending = sd
		g.mu.Unlock()
	}
	if err != nil {
		return fmt.Errorf("desired state refused: %w; give this agent the controller's director.pub as --director-key, or let the controller announce its new key (ef/v1/dev/ID/keys)", err)
	}
	return nil
}

// CheckVersion enforces the slot's version floor and raises it to the
// running version.
func (g *TrustGuard) CheckVersion(slot string, running *Ref, next Ref, rollback bool) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.loadLocked(); err != nil {
		return err
	}
	f, ok := g.floors[slot]
	if running != nil && (!ok || f.Model != running.Name || CompareVersions(running.Version, f.Version) > 0) {
		// The floor follows the highest version that actually ran, not the
		// one merely ordered: a version that fails its health watch must
		// not lock the slot above the version that serves.
		f, ok = Floor{Model: running.Name, Version: running.Version}, true
		g.floors[slot] = f
	}
	director, err := g.keySetLocked(pb.KeyRole_KEY_ROLE_DIRECTOR)
	if err != nil {
		return err
	}
	signedRollback := rollback && director != nil && !g.AllowUnsigned
	switch {
	case !ok || f.Model != next.Name || CompareVersions(next.Version, f.Version) >= 0:
	case signedRollback:
		g.log().Warn("signed rollback order below the version floor", "slot", slot, "model", next.Name, "version", next.Version, "floor", f.Version)
		f = Floor{Model: next.Name, Version: next.Version}
		g.floors[slot] = f
	default:
		why := "the desired state does not order a rollback"
		if rollback {
			why = "its rollback order is not director-signed (configure --director-key and drop --allow-unsigned)"
		}
		return fmt.Errorf("slot %s: %s %s is below the version floor %s, and %s; refusing the downgrade: assign %s or newer, or issue a rollback from a rollout",
			slot, next.Name, next.Version, f.Version, why, f.Version)
	}
	return g.saveLocked()
}

// Floors returns the version floors by slot.
func (g *TrustGuard) Floors() (map[string]Floor, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.loadLocked(); err != nil {
		return nil, err
	}
	out := make(map[string]Floor, len(g.floors))
	for k, v := range g.floors {
		out[k] = v
	}
	return out, nil
}

func (g *TrustGuard) loadLocked() error {
	if g.floors != nil {
		return nil
	}
	path := filepath.Join(g.DataDir, FloorsFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		g.floors = map[string]Floor{}
		return nil
	}
	if err != nil {
		return fmt.Errorf("version floors %s: %w", path, err)
	}
	floors, err := DecodeFloors(b)
	if err != nil {
		// Failing closed: without the floors any old signed version would
		// install. The operator decides (restore or delete the file).
		return fmt.Errorf("version floors %s: %w; restore the file, or delete it to reset every slot's floor", path, err)
	}
	g.floors = floors
	return nil
}

func (g *TrustGuard) saveLocked() error {
	b, err := json.MarshalIndent(g.floors, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(g.DataDir, 0o755); err != nil {
		return fmt.Errorf("version floors: %w", err)
	}
	return durable.WriteFile(filepath.Join(g.DataDir, FloorsFile), b)
}

// DecodeFloors parses floors.json.
func DecodeFloors(b []byte) (map[string]Floor, error) {
	if len(b) > maxFloorsFile {
		return nil, fmt.Errorf("%d bytes, over the %d byte cap", len(b), maxFloorsFile)
	}
	floors := map[string]Floor{}
	if err := json.Unmarshal(b, &floors); err != nil {
		return nil, err
	}
	if len(floors) > MaxSlots {
		return nil, fmt.Errorf("%d slots, at most %d", len(floors), MaxSlots)
	}
	for slot, f := range floors {
		if !slotRE.MatchString(slot) || f.Model == "" || !validVersion(f.Version) {
			return nil, fmt.Errorf("slot %q: floor %q %q is malformed", slot, f.Model, f.Version)
		}
	}
	return floors, nil
}

// CompareVersions orders two semantic versions (major.minor.patch with an
// optional -prerelease, which sorts before its release); -1, 0 or 1.
// Prerelease identifiers compare numerically when both are numbers,
// otherwise as strings. A malformed version sorts below every valid one,
// so it can never be used to cross a floor.
func CompareVersions(a, b string) int {
	va, oka := parseVersion(a)
	vb, okb := parseVersion(b)
	switch {
	case !oka && !okb:
		return strings.Compare(a, b)
	case !oka:
		return -1
	case !okb:
		return 1
	}
	for i := range 3 {
		if c := cmpInt(va.num[i], vb.num[i]); c != 0 {
			return c
		}
	}
	switch {
	case va.pre == "" && vb.pre == "":
		return 0
	case va.pre == "":
		return 1
	case vb.pre == "":
		return -1
	}
	xa, xb := strings.Split(va.pre, "."), strings.Split(vb.pre, ".")
	for i := 0; i < len(xa) && i < len(xb); i++ {
		na, ea := strconv.ParseUint(xa[i], 10, 64)
		nb, eb := strconv.ParseUint(xb[i], 10, 64)
		var c int
		switch {
		case ea == nil && eb == nil:
			c = cmpInt(na, nb)
		case ea == nil:
			c = -1
		case eb == nil:
			c = 1
		default:
			c = strings.Compare(xa[i], xb[i])
		}
		if c != 0 {
			return c
		}
	}
	return cmpInt(uint64(len(xa)), uint64(len(xb)))
}

type version struct {
	num [3]uint64
	pre string
}

func validVersion(s string) bool { _, ok := parseVersion(s); return ok }

func parseVersion(s string) (version, bool) {
	var v version
	core, pre, hasPre := strings.Cut(s, "-")
	if hasPre {
		if pre == "" {
			return v, false
		}
		v.pre = pre
	}
	parts := strings.Split(core, ".")
	if len(parts) != 3 {
		return v, false
	}
	for i, p := range parts {
		n, err := strconv.ParseUint(p, 10, 64)
		if err != nil || (len(p) > 1 && p[0] == '0') {
			return v, false
		}
		v.num[i] = n
	}
	return v, true
}

func cmpInt(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// TrustFile is the file in the data directory that holds what key
// announcements taught the agent: per role, the last applied sequence,
// the keys trusted with their retirement times, and the keys retired.
const TrustFile = "trust.json"

// maxTrustFile caps trust.json: a handful of keys per role.
const maxTrustFile = 64 << 10

// keyState is trust.json. A role appears once an announcement for it was
// applied; from then on its Keys are the role's whole trusted set, except
// that a key configured later (a flag) that the file never mentioned is
// trusted too, so an operator can always re-provision by configuration.
// A configured key the file lists as retired stays retired: a rotation
// away from a compromised key must survive the agent's restart with its
// old flags.
type keyState struct {
	Roles map[string]*roleKeys `json:"roles"`
}

type roleKeys struct {
	Sequence uint64       `json:"sequence"`
	Keys     []trustedKey `json:"keys"`
	Retired  []string     `json:"retired,omitempty"`
}

type trustedKey struct {
	ID        string `json:"id"`
	PublicKey []byte `json:"public_key"`
	// RetireAtUnixMs ends the key's trust; zero means no end.
	RetireAtUnixMs int64 `json:"retire_at_unix_ms,omitempty"`
}

// KeyChange is one applied key announcement.
type KeyChange struct {
	Role     string
	KeyID    string
	Sequence uint64
	// RetirePrevious is when the keys trusted before stop being trusted
	// (the zero time: at once).
	RetirePrevious time.Time
}

func (g *TrustGuard) now() time.Time {
	if g.Now == nil {
		return time.Now()
	}
	return g.Now()
}

func (g *TrustGuard) configured(role pb.KeyRole) *trust.KeySet {
	if role == pb.KeyRole_KEY_ROLE_RELEASE {
		return g.Release
	}
	return g.Director
}

// KeySet returns the keys trusted now for role: the configured ones as
// changed by applied announcements. Nil means the role is not checked (no
// key configured and none announced). An unreadable trust.json fails
// closed: every check errs until it is restored or deleted.
func (g *TrustGuard) KeySet(role pb.KeyRole) (*trust.KeySet, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.keySetLocked(role)
}

func (g *TrustGuard) keySetLocked(role pb.KeyRole) (*trust.KeySet, error) {
	if err := g.loadKeysLocked(); err != nil {
		return nil, err
	}
	return g.effective(g.keys, role, g.now()), nil
}

func (g *TrustGuard) effective(st *keyState, role pb.KeyRole, now time.Time) *trust.KeySet {
	base := g.configured(role)
	rk := st.Roles[trust.RoleName(role)]
	if rk == nil {
		return base
	}
	ks := trust.NewKeySet()
	mentioned := map[string]bool{}
	for _, k := range rk.Keys {
		mentioned[k.ID] = true
		if k.RetireAtUnixMs == 0 || now.UnixMilli() < k.RetireAtUnixMs {
			ks.Add(ed25519.PublicKey(k.PublicKey))
		}
	}
	for _, id := range rk.Retired {
		mentioned[id] = true
	}
	if base != nil {
		for _, id := range base.IDs() {
			if pub, ok := base.Key(id); ok && !mentioned[id] {
				ks.Add(pub)
			}
		}
	}
	return ks
}

// TakePendingDesired returns, once, the last desired state refused for an
// unknown signer, so the agent can offer it again after a key
// announcement; nil when there is none.
func (g *TrustGuard) TakePendingDesired() *pb.SignedDesiredState {
	g.mu.Lock()
	defer g.mu.Unlock()
	sd := g.pending
	g.pending = nil
	return sd
}

// acceptedBefore reports whether sd carries the same desired bytes as the
// state the agent accepted last (DATA/desired.pb).
func (g *TrustGuard) acceptedBefore(sd *pb.SignedDesiredState) bool {
	b, err := os.ReadFile(filepath.Join(g.DataDir, DesiredFile))
	if err != nil || len(b) > MaxDesired+1024 {
		return false
	}
	var last pb.SignedDesiredState
	if proto.Unmarshal(b, &last) != nil {
		return false
	}
	return len(last.GetDesired()) > 0 && string(last.GetDesired()) == string(sd.GetDesired())
}

// ApplyKeys applies the announcements of ka in order, each verified with
// the keys trusted for its role at that point, and persists the result
// (DATA/trust.json, written atomically and synced) before it is used.
//
// Per role, announcements up to the last one whose key is already
// trusted are skipped: the agent has them, or was configured with a newer
// key than they announce. After that, an announcement whose sequence is
// not above the last applied one is a replay, and one that does not
// verify is refused; both are returned in the error, each only the first
// time it is seen, since the broker redelivers the retained chain at
// every reconnect.
func (g *TrustGuard) ApplyKeys(ka *pb.KeyAnnouncements) ([]KeyChange, error) {
	if err := trust.CheckAnnouncements(ka); err != nil {
		return nil, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if err := g.loadKeysLocked(); err != nil {
		return nil, err
	}
	if g.refused == nil {
		g.refused = map[string]bool{}
	}
	now := g.now()
	list := ka.GetAnnouncements()
	decoded := make([]*pb.KeyAnnouncement, len(list))
	skipTo := map[pb.KeyRole]int{}
	for i, s := range list {
		a, _ := trust.DecodeAnnouncement(s) // the form was checked above
		decoded[i] = a
		if ks := g.effective(g.keys, a.GetRole(), now); ks != nil {
			if _, ok := ks.Key(a.GetKeyId()); ok {
				skipTo[a.GetRole()] = i + 1
			}
		}
	}
	var changes []KeyChange
	var errs []error
	for i, s := range list {
		a := decoded[i]
		role := a.GetRole()
		if i < skipTo[role] {
			continue
		}
		if err := g.applyLocked(s, a, now); err != nil {
			if !g.refused[string(s.GetSignature())] {
				g.refused[string(s.GetSignature())] = true
				errs = append(errs, err)
			}
			continue
		}
		c := KeyChange{Role: trust.RoleName(role), KeyID: a.GetKeyId(), Sequence: a.GetSequence()}
		if ms := a.GetRetirePreviousAtUnixMs(); ms != 0 {
			c.RetirePrevious = time.UnixMilli(ms)
		}
		changes = append(changes, c)
		g.log().Warn("key announcement applied", "role", c.Role, "key", c.KeyID, "sequence", c.Sequence, "retire_previous_at", c.RetirePrevious)
	}
	return changes, errors.Join(errs...)
}

// applyLocked verifies one announcement and makes its key trusted, saving
// trust.json first.
func (g *TrustGuard) applyLocked(s *pb.SignedKeyAnnouncement, a *pb.KeyAnnouncement, now time.Time) error {
	role := a.GetRole()
	name := trust.RoleName(role)
	rk := g.keys.Roles[name]
	if rk != nil && a.GetSequence() <= rk.Sequence {
		return fmt.Errorf("%s key announcement %d (key %s): %w: sequence %d was applied already; ignoring it",
			name, a.GetSequence(), a.GetKeyId(), trust.ErrReplay, rk.Sequence)
	}
	ks := g.effective(g.keys, role, now)
	if _, err := trust.VerifyAnnouncement(ks, s); err != nil {
		return fmt.Errorf("%w; the announcement must be signed by a %s key this agent trusts now (trusted: %s)", err, name, strings.Join(ids(ks), ","))
	}
	next := &roleKeys{Sequence: a.GetSequence()}
	retireAt := a.GetRetirePreviousAtUnixMs()
	retired := map[string]bool{}
	if rk != nil {
		for _, id := range rk.Retired {
			retired[id] = true
		}
	}
	for _, id := range ks.IDs() {
		if id == a.GetKeyId() {
			continue
		}
		pub, _ := ks.Key(id)
		at := retireAt
		if rk != nil {
			for _, k := range rk.Keys {
				if k.ID == id && k.RetireAtUnixMs != 0 && (at == 0 || k.RetireAtUnixMs < at) {
					at = k.RetireAtUnixMs
				}
			}
		}
		if at == 0 || at <= now.UnixMilli() {
			retired[id] = true
			continue
		}
		next.Keys = append(next.Keys, trustedKey{ID: id, PublicKey: pub, RetireAtUnixMs: at})
	}
	// Keys whose window ended before this announcement are retired too.
	if rk != nil {
		for _, k := range rk.Keys {
			if _, ok := ks.Key(k.ID); !ok {
				retired[k.ID] = true
			}
		}
	}
	delete(retired, a.GetKeyId())
	next.Keys = append(next.Keys, trustedKey{ID: a.GetKeyId(), PublicKey: a.GetPublicKey()})
	for id := range retired {
		next.Retired = append(next.Retired, id)
	}
	sort.Strings(next.Retired)

	st := &keyState{Roles: map[string]*roleKeys{}}
	for k, v := range g.keys.Roles {
		st.Roles[k] = v
	}
	st.Roles[name] = next
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(g.DataDir, 0o755); err != nil {
		return fmt.Errorf("trusted keys: %w", err)
	}
	// Persisted before used: a power cut after this point keeps the
	// rotation, one before it loses it and the retained chain brings it
	// again.
	if err := durable.WriteFile(filepath.Join(g.DataDir, TrustFile), b); err != nil {
		return fmt.Errorf("%s key announcement %d: cannot save %s: %w; free disk space on the device", name, a.GetSequence(), TrustFile, err)
	}
	g.keys = st
	return nil
}

func ids(ks *trust.KeySet) []string {
	if ks == nil {
		return nil
	}
	return ks.IDs()
}

func (g *TrustGuard) loadKeysLocked() error {
	if g.keys != nil {
		return nil
	}
	path := filepath.Join(g.DataDir, TrustFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		g.keys = &keyState{Roles: map[string]*roleKeys{}}
		return nil
	}
	if err != nil {
		return fmt.Errorf("trusted keys %s: %w", path, err)
	}
	st, err := decodeKeyState(b)
	if err != nil {
		// Failing closed: falling back to the configured keys could trust
		// again a key a rotation retired.
		return fmt.Errorf("trusted keys %s: %w; restore the file, or delete it to trust only the configured keys", path, err)
	}
	g.keys = st
	return nil
}

func decodeKeyState(b []byte) (*keyState, error) {
	if len(b) > maxTrustFile {
		return nil, fmt.Errorf("%d bytes, over the %d byte cap", len(b), maxTrustFile)
	}
	st := &keyState{}
	if err := json.Unmarshal(b, st); err != nil {
		return nil, err
	}
	if st.Roles == nil {
		st.Roles = map[string]*roleKeys{}
	}
	for name, rk := range st.Roles {
		if _, err := trust.ParseRole(name); err != nil || rk == nil {
			return nil, fmt.Errorf("role %q is malformed", name)
		}
		if len(rk.Keys)+len(rk.Retired) > 4*trust.MaxAnnouncements {
			return nil, fmt.Errorf("role %s lists %d keys", name, len(rk.Keys)+len(rk.Retired))
		}
		for _, k := range rk.Keys {
			if len(k.PublicKey) != ed25519.PublicKeySize || trust.KeyID(k.PublicKey) != k.ID {
				return nil, fmt.Errorf("role %s: key %q is malformed", name, k.ID)
			}
		}
	}
	return st, nil
}
