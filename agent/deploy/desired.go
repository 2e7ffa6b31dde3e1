package deploy

import (
	"fmt"
	"math"
	"regexp"

	"github.com/edgefleet/edgefleet/agent/fetch"
	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// MaxDesired caps the serialized DesiredState. It arrives inside one MQTT
// payload, so it can never be bigger than that.
const MaxDesired = wire.MaxPayload

// MaxSlots caps the slots of one desired state.
const MaxSlots = 64

var slotRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// DecodeDesired decodes and checks the DesiredState inside sd. It does not
// check the signature (that needs the director key) nor the generation
// (that needs the agent's state). The error says what is malformed.
func DecodeDesired(sd *pb.SignedDesiredState) (*pb.DesiredState, error) {
	raw := sd.GetDesired()
	if len(raw) == 0 {
		return nil, fmt.Errorf("desired state is empty")
	}
	if len(raw) > MaxDesired {
		return nil, fmt.Errorf("desired state is %d bytes, over the %d byte cap", len(raw), MaxDesired)
	}
	ds := &pb.DesiredState{}
	if err := proto.Unmarshal(raw, ds); err != nil {
		return nil, fmt.Errorf("desired state does not decode: %w", err)
	}
	if err := wire.ValidateDeviceID(ds.GetDeviceId()); err != nil {
		return nil, fmt.Errorf("desired state: %w", err)
	}
	if ds.GetGeneration() == 0 {
		return nil, fmt.Errorf("desired state generation is 0; generations start at 1")
	}
	if r := ds.GetRenewsGeneration(); r >= ds.GetGeneration() {
		return nil, fmt.Errorf("desired state generation %d renews generation %d, which is not older", ds.GetGeneration(), r)
	}
	if n := len(ds.GetSlots()); n > MaxSlots {
		return nil, fmt.Errorf("desired state has %d slots; the limit is %d", n, MaxSlots)
	}
	seen := map[string]bool{}
	for i, s := range ds.GetSlots() {
		if !slotRE.MatchString(s.GetSlot()) {
			return nil, fmt.Errorf("desired slot %d: name %q: use 1-63 letters, digits, '.', '_' or '-'", i, s.GetSlot())
		}
		if seen[s.GetSlot()] {
			return nil, fmt.Errorf("desired slot %q is listed twice", s.GetSlot())
		}
		seen[s.GetSlot()] = true
		m := s.GetModel()
		if m.GetName() == "" || m.GetVersion() == "" {
			return nil, fmt.Errorf("desired slot %q: model needs a name and a version", s.GetSlot())
		}
		if !fetch.ValidDigest(m.GetBundleSha256()) {
			return nil, fmt.Errorf("desired slot %q: bundle_sha256 %q is not 64 lowercase hex digits", s.GetSlot(), m.GetBundleSha256())
		}
		if s.GetUrl() == "" {
			return nil, fmt.Errorf("desired slot %q: no download url", s.GetSlot())
		}
		if s.GetSize() < 0 || s.GetSize() > bundle.MaxBundleSize {
			return nil, fmt.Errorf("desired slot %q: size %d is outside 0..%d", s.GetSlot(), s.GetSize(), bundle.MaxBundleSize)
		}
		if err := checkShadow(s.GetShadow()); err != nil {
			return nil, fmt.Errorf("desired slot %q: shadow policy: %w", s.GetSlot(), err)
		}
	}
	return ds, nil
}

// checkShadow refuses a shadow policy whose figures mean nothing; zero
// fields are unset (the agent's defaults).
func checkShadow(p *pb.ShadowPolicy) error {
	if p == nil {
		return nil
	}
	if a := p.GetMinAgreement(); math.IsNaN(a) || a < 0 || a > 1 {
		return fmt.Errorf("min_agreement %v is outside 0..1", a)
	}
	if t := p.GetTolerance(); math.IsNaN(t) || math.IsInf(t, 0) || t < 0 {
		return fmt.Errorf("tolerance %v is not a finite, non-negative number", t)
	}
	return nil
}
