package cli

import (
	"bufio"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"

	mochi "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
)

func TestSimUsageErrors(t *testing.T) {
	t.Setenv("EDGEFLEET_CONTROLLER", "http://127.0.0.1:1")
	t.Setenv("EDGEFLEET_BROKER", "")
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"sim"}, "--agents N is required"},
		{[]string{"sim", "--agents", "3", "extra"}, `unexpected argument "extra"`},
		{[]string{"sim", "--agents", "3", "--labels", "region"}, "--labels"},
		{[]string{"sim", "--agents", "3", "--offline", "2"}, "offline fraction"},
		{[]string{"sim", "--agents", "3", "--loss", "1"}, "loss"},
		{[]string{"sim", "--agents", "3", "--fail-model", "@1.0.0"}, "fail model"},
		{[]string{"sim", "--agents", "3", "--log-level", "loud"}, "--log-level"},
		{[]string{"sim", "--agents", "3", "-o", "xml"}, `-o "xml"`},
		{[]string{"sim", "--agents", "3", "--controller", "::"}, "set --broker"},
	} {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			code, _, stderr := run(t, c.args...)
			if code != 2 || !strings.Contains(stderr, c.want) {
				t.Fatalf("exit %d, stderr %q; want exit 2 and %q", code, stderr, c.want)
			}
		})
	}
}

// fleet sim against a real broker: the devices join, and -o json reports
// the counters as JSON lines, the last one final.
func TestSimRuns(t *testing.T) {
	srv := mochi.New(&mochi.Options{Logger: slog.New(slog.DiscardHandler)})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	l := listeners.NewTCP(listeners.Config{ID: "t", Address: "127.0.0.1:0"})
	if err := srv.AddListener(l); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })

	code, stdout, stderr := run(t, "sim", "--agents", "5", "--broker", "tcp://"+l.Address(), "--controller", "http://127.0.0.1:1",
		"--labels", "region=eu:4,us:1", "--prefix", "cli-", "--for", "1500ms", "--every", "200ms", "-o", "json", "--log-level", "warn", "--allow-unsigned")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr)
	}
	var last simStatus
	lines := 0
	sc := bufio.NewScanner(strings.NewReader(stdout))
	for sc.Scan() {
		lines++
		last = simStatus{}
		if err := json.Unmarshal(sc.Bytes(), &last); err != nil {
			t.Fatalf("line %d is not JSON: %q: %v", lines, sc.Text(), err)
		}
	}
	if lines < 3 || !last.Final {
		t.Fatalf("%d lines, last final=%v; want a few reports and a final one:\n%s", lines, last.Final, stdout)
	}
	if last.Agents != 5 || last.Joined != 5 || last.Published == 0 {
		t.Fatalf("final report %+v: want 5 devices joined", last)
	}
}
