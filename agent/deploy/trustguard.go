package deploy

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
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
// A nil key set leaves that check off (with a warning from the agent at
// start). AllowUnsigned accepts unsigned bundles and desired states with
// a warning, for a fleet in transition; a present signature is still
// checked, and rollback orders are then not trusted to cross the floor.
type TrustGuard struct {
	Release       *trust.KeySet
	Director      *trust.KeySet
	AllowUnsigned bool
	// DataDir holds floors.json.
	DataDir string
	Logger  *slog.Logger

	mu     sync.Mutex
	floors map[string]Floor // nil until loaded
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
	if g.Release == nil {
		return nil
	}
	id := fmt.Sprintf("bundle %s@%s (sha256:%s)", b.Manifest.Name, b.Manifest.Version, b.Digest)
	if len(b.Signature) == 0 {
		if g.AllowUnsigned {
			g.log().Warn("ACCEPTING AN UNSIGNED BUNDLE (--allow-unsigned)", "model", b.Manifest.Name, "version", b.Manifest.Version)
			return nil
		}
		return fmt.Errorf("%s is not signed (no %s); trusted release keys are %s: sign it with `fleet model sign` and upload it again",
			id, bundle.SignatureName, strings.Join(g.Release.IDs(), ","))
	}
	sigs, err := trust.DecodeSignatures(b.Signature)
	if err != nil {
		return fmt.Errorf("%s: %s: %w; sign it again with `fleet model sign`", id, bundle.SignatureName, err)
	}
	if err := g.Release.Verify(trust.DomainBundleManifest, b.ManifestJSON, sigs); err != nil {
		return fmt.Errorf("%s refused: %w; sign it with a release key this agent trusts (--release-key), or add the signer's public key to the agent", id, err)
	}
	return nil
}

// CheckDesired verifies the director signature over sd's desired bytes.
func (g *TrustGuard) CheckDesired(sd *pb.SignedDesiredState) error {
	if g.Director == nil {
		return nil
	}
	if len(sd.GetSignature()) == 0 {
		if g.AllowUnsigned {
			g.log().Warn("ACCEPTING AN UNSIGNED DESIRED STATE (--allow-unsigned)")
			return nil
		}
		return fmt.Errorf("desired state is not signed; trusted director keys are %s: the controller must sign it (check that it has DATA/keys/director.key and that this agent has its director.pub as --director-key)",
			strings.Join(g.Director.IDs(), ","))
	}
	sig := trust.Signature{KeyID: sd.GetKeyId(), Sig: sd.GetSignature()}
	if err := g.Director.Verify(trust.DomainDesiredState, sd.GetDesired(), []trust.Signature{sig}); err != nil {
		return fmt.Errorf("desired state refused: %w; give this agent the controller's director.pub as --director-key", err)
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
	signedRollback := rollback && g.Director != nil && !g.AllowUnsigned
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
	return atomicWrite(filepath.Join(g.DataDir, FloorsFile), b)
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
