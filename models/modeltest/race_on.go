//go:build race

package modeltest

// raceEnabled reports whether this test binary runs under the race detector.
const raceEnabled = true
