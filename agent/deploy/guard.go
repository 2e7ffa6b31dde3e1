package deploy

import (
	"github.com/edgefleet/edgefleet/models/bundle"
)

// Guard is the seam where the security issue plugs in its checks: bundle
// signatures against the pinned release keys, and the version floor that
// refuses older versions unless the signed desired state orders the
// rollback. The manager calls it at two points of every install; an error
// refuses the assignment for good (FAILED, not retried: the same digest
// is the same bytes) and is reported as it is, so it must say what to do.
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
}

// AllowAll is the Guard of the walking skeleton: it checks nothing.
type AllowAll struct{}

// CheckBundle allows every bundle.
func (AllowAll) CheckBundle(*bundle.Bundle) error { return nil }

// CheckVersion allows every version.
func (AllowAll) CheckVersion(string, *Ref, Ref, bool) error { return nil }
