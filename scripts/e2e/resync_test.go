package e2e

import (
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/edgefleet/edgefleet/controller/store"
)

// TestResyncRestoresALostHello: a controller without a device's hello
// asks the device to say it again. The agent stays connected to Mosquitto
// while the controller is down and comes back without the device's row
// (as if its hello had been lost, as 63 were in a burst of 1,000 agents
// connecting in one second); the device's retained state and presence
// reach the new controller, which sends the resync command once the grace
// period (10 s) is over, and the agent answers with its hello: its labels
// are back without it reconnecting. A new device, whose presence comes
// before its hello, is not asked.
func TestResyncRestoresALostHello(t *testing.T) {
	f := startController(t, startMosquitto(t))
	const id = "resync-1"
	started := time.Now()
	f.startAgent(id, "site=lost", "hw=rpi5")
	labelled := func() (bool, string) {
		for _, d := range f.devices("site=lost") {
			if d.ID == id && d.Labels["hw"] == "rpi5" && d.Online {
				return true, ""
			}
		}
		return false, fmt.Sprint(f.devices(""))
	}
	f.eventually("the device's hello", 30*time.Second, labelled)
	agentLog := func() string {
		b, _ := os.ReadFile(filepath.Join(f.dir, id+".log"))
		return string(b)
	}
	connects := strings.Count(agentLog(), "connected to broker")
	// Past the grace of the device's first presence: nothing may happen.
	time.Sleep(time.Until(started.Add(11 * time.Second)))
	if strings.Contains(agentLog(), "name=resync") {
		t.Fatalf("a new device was asked to resync\n%s", f.logs())
	}

	f.ctrl.Kill()
	db, err := sql.Open("sqlite", filepath.Join(f.dir, "controller", store.FileName))
	if err != nil {
		t.Fatal(err)
	}
	res, err := db.Exec(`DELETE FROM devices WHERE id = ?`, id)
	if err == nil {
		var n int64
		if n, err = res.RowsAffected(); err == nil && n != 1 {
			err = fmt.Errorf("%d rows deleted, want 1", n)
		}
	}
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	f.restartController()

	f.eventually("the device's labels after the resync", 45*time.Second, labelled)
	// The hello came from the command, not from a reconnect.
	n, resyncs := strings.Count(agentLog(), "connected to broker"), strings.Count(agentLog(), "name=resync")
	if n != connects || resyncs != 1 {
		t.Fatalf("the agent connected %d times (%d before the restart) and got %d resync commands, want 1\n%s", n, connects, resyncs, f.logs())
	}
	ctrlLog, _ := os.ReadFile(filepath.Join(f.dir, "controller.log"))
	if !strings.Contains(string(ctrlLog), "asking it to resync") {
		t.Fatalf("the controller logged no resync\n%s", f.logs())
	}
}
