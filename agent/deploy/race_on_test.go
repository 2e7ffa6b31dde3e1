//go:build race

package deploy

// raceEnabled: the race detector slows the host's Go code, not the guests'.
const raceEnabled = true
