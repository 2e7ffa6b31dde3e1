package agentbuild

import (
	"slices"
	"strings"
	"testing"
)

func TestArgs(t *testing.T) {
	args := Args("out", Options{X: []string{"a.B=1"}})
	if !slices.Contains(args, "-ldflags="+Strip+" -X a.B=1") || !slices.Contains(args, "-tags=nethttpomithttp2") || args[len(args)-1] != Package {
		t.Fatalf("args %q", args)
	}
	sym := Args("out", Options{Symbols: true})
	if slices.ContainsFunc(sym, func(a string) bool { return strings.HasPrefix(a, "-ldflags=") && strings.Contains(a, Strip) }) {
		t.Fatalf("symbols build strips: %q", sym)
	}
}
