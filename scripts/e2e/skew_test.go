package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/edgefleet/edgefleet/agent/deploy"
	pb "github.com/edgefleet/edgefleet/proto/edgefleetv1"
	"github.com/edgefleet/edgefleet/proto/trust"
	"github.com/edgefleet/edgefleet/proto/wire"
	"google.golang.org/protobuf/proto"
)

// faketimeMovesAgentClock runs the agent binary the tests use (built with
// CGO_ENABLED=0, like `make build`) under faketime one day ahead and
// reads the clock back from the time= of its first log line. It reports
// whether faketime moved the agent's clock, and why not.
//
// It does not, on Linux: libfaketime works by LD_PRELOAD, replacing libc's
// clock_gettime, and a Go program reads the wall clock through the
// kernel's vDSO from its own runtime, never through libc. A static binary
// does not even load the preload library; a cgo build loads it, and its C
// code sees the fake time, but time.Now still does not (see RATIONALE.md).
func faketimeMovesAgentClock(t *testing.T) (bool, string) {
	t.Helper()
	ft, err := exec.LookPath("faketime")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("faketime is not installed; .ci/run installs it (apt-get install -y faketime)")
		}
		return false, "faketime is not installed (apt-get install -y faketime)"
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, ft, "-f", "+86400", filepath.Join(binDir, "fleet-agent"),
		"--id", "faketime-probe", "--data", t.TempDir(), "--listen", "127.0.0.1:0", "--broker", "tcp://127.0.0.1:1", "--allow-unsigned")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	sc := bufio.NewScanner(stderr)
	for sc.Scan() {
		_, rest, ok := strings.Cut(sc.Text(), "time=")
		if !ok {
			continue
		}
		stamp, _, _ := strings.Cut(rest, " ")
		at, err := time.Parse(time.RFC3339Nano, stamp)
		if err != nil {
			t.Fatalf("agent log time %q: %v", stamp, err)
		}
		if d := time.Until(at); d > 23*time.Hour {
			return true, ""
		}
		return false, fmt.Sprintf("under `faketime -f +86400` the agent logged time=%s, the real time: libfaketime replaces libc's clock_gettime, and Go reads the clock through the vDSO, not libc", stamp)
	}
	t.Fatalf("the agent under faketime logged no time= line: %v", sc.Err())
	return false, ""
}

// TestClockSkew runs a real agent that trusts the controller's director
// key and offers it director-signed desired states whose issue and expiry
// times are off from the agent's clock by more and by less than the
// allowance (deploy.DefaultClockSkew) in both directions: an agent clock
// ahead past the expiry plus the allowance refuses the state as expired,
// one behind by more than the allowance refuses it as issued in the
// future; within the allowance both are accepted.
//
// The clock difference is made on the controller's side of the
// comparison, by stamping the states (the test holds the director key):
// faketime cannot move a Go program's clock, which the test checks on the
// real agent binary first (faketimeMovesAgentClock says why).
func TestClockSkew(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test; skipped with -short")
	}
	t.Parallel()
	f, _ := signedFleet(t)
	if moves, why := faketimeMovesAgentClock(t); moves {
		// Not the case with Go on Linux today. The shifted timestamps
		// test the same comparison either way.
		t.Log("faketime moves the agent's clock here: the agent could be run under it instead")
	} else {
		t.Logf("NOT USING FAKETIME: %s; the states' timestamps are shifted instead", why)
	}
	director, err := trust.ReadPrivateKey(filepath.Join(f.dir, "controller", "keys", "director.key"))
	if err != nil {
		t.Fatal(err)
	}
	const id = "e2e-skew-1"
	f.startAgent(id, "trust=skew")

	spy := mqtt.NewClient(mqtt.NewClientOptions().AddBroker(f.broker).SetClientID("e2e-skew-spy").SetConnectTimeout(5 * time.Second))
	if tok := spy.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", f.broker, tok.Error())
	}
	defer spy.Disconnect(250)
	// The offers below are not retained: wait for the agent's hello, which
	// it sends only once its subscriptions are in place.
	f.eventually("agent online", 30*time.Second, func() (bool, string) {
		d, err := f.client.Device(context.Background(), id)
		if err != nil {
			return false, err.Error()
		}
		return d.Online, "not online yet"
	})
	const validFor = time.Hour
	skew := deploy.DefaultClockSkew
	offer := func(gen uint64, agentAhead time.Duration) {
		t.Helper()
		// The controller's clock is the agent's minus agentAhead.
		issued := time.Now().Add(-agentAhead)
		raw, err := proto.MarshalOptions{Deterministic: true}.Marshal(&pb.DesiredState{DeviceId: id, Generation: gen,
			IssuedAtUnixMs: issued.UnixMilli(), ExpiresAtUnixMs: issued.Add(validFor).UnixMilli()})
		if err != nil {
			t.Fatal(err)
		}
		sig := trust.Sign(director, trust.DomainDesiredState, raw)
		payload, err := wire.Seal(id, time.Now(), &pb.SignedDesiredState{Desired: raw, Signature: sig.Sig, KeyId: sig.KeyID})
		if err != nil {
			t.Fatal(err)
		}
		if tok := spy.Publish(wire.Topic(id, wire.KindDesired), 1, false, payload); !tok.WaitTimeout(5*time.Second) || tok.Error() != nil {
			t.Fatalf("publish: %v", tok.Error())
		}
	}
	accepted := func(gen uint64) {
		t.Helper()
		f.eventually(fmt.Sprintf("generation %d accepted", gen), 30*time.Second, func() (bool, string) {
			d, err := f.client.Device(context.Background(), id)
			if err != nil {
				return false, err.Error()
			}
			return d.ReportedGeneration == gen, fmt.Sprintf("reported generation %d", d.ReportedGeneration)
		})
	}
	margin := 2 * time.Minute
	cases := []struct {
		name       string
		agentAhead time.Duration
		gen        uint64
		refused    string // event detail; "" means accepted
		nth        int
	}{
		{"agent ahead past expiry and allowance", validFor + skew + margin, 10, "expired at", 1},
		{"agent ahead past expiry, within allowance", validFor + skew - margin, 11, "", 0},
		{"agent behind by more than the allowance", -(skew + margin), 12, "fix the device clock", 1},
		{"agent behind within the allowance", -(skew - margin), 13, "", 0},
	}
	for _, c := range cases {
		t.Logf("%s: the agent's clock is %s ahead of the controller's", c.name, c.agentAhead)
		offer(c.gen, c.agentAhead)
		if c.refused != "" {
			f.waitEvent(id, "refused", c.refused, c.nth)
			continue
		}
		accepted(c.gen)
	}
	// The refused ones were not accepted later either.
	d, err := f.client.Device(context.Background(), id)
	if err != nil || d.ReportedGeneration != 13 {
		t.Fatalf("reported generation %d, %v", d.ReportedGeneration, err)
	}
}
