package deploy

import (
	"github.com/edgefleet/edgefleet/models/bundle"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
)

// Guard holds the trust checks: bundle signatures against the pinned
// release keys, desired-state signatures against the director keys, and
// the version floor that refuses older versions unless the signed desired
// state orders the rollback. TrustGuard is the production one.
//
// The manager calls CheckVersion and CheckBundle at two points of every
// install; an error refuses the bundle for good (FAILED, not retried: the
// same digest is the same bytes; a version refusal is retried only under
// a new generation, which may order a rollback). CheckDesired runs on
// every offered desired state; an error refuses it (REFUSED). Errors are
// reported as they are, so they must say what to do.
//
// Embed AllowAll to implement only the checks you need.
type Guard interface {
	// CheckBundle runs on every bundle whose digest matched, before any of
	// its code is compiled.
	CheckBundle(b *bundle.Bundle) error
	// CheckVersion runs before next is installed into slot, whose active
	// version is running (nil when empty); rollback is the assignment's
	// rollback flag: the controller deliberately installs an older version.
	CheckVersion(slot string, running *Ref, next Ref, rollback bool) error
	// CheckDesired runs on every offered desired state before its bytes
	// are decoded: the director signature. An error refuses the state
	// (REFUSED); the accepted one keeps being served.
	CheckDesired(sd *pb.SignedDesiredState) error
}

// AllowAll is the Guard of the walking skeleton: it checks nothing.
type AllowAll struct{}

// CheckBundle allows every bundle.
func (AllowAll) CheckBundle(*bundle.Bundle) error { return nil }

// CheckVersion allows every version.
func (AllowAll) CheckVersion(string, *Ref, Ref, bool) error { return nil }

// CheckDesired allows every desired state.
func (AllowAll) CheckDesired(*pb.SignedDesiredState) error { return nil }
