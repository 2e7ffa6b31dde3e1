package rollout

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestParseSpecNormalizes(t *testing.T) {
	s, err := ParseSpec([]byte(`{
		"selector": "region=eu,hw in (jetson,rpi5),!lab",
		"model": "grid-anomaly@1.1.0",
		"strategy": {
			"waves": ["1%", 10, {"size": "50%", "approval": true, "soak": "1m"}, {"size": "100%", "gates": []}],
			"stratifyBy": "site",
			"soak": "10m",
			"gates": [{"type": "errorRate", "max": 0.02}, {"type": "latency", "maxP99Ratio": 1.5}],
			"failureBudget": "2%",
			"maxConcurrentDownloads": 50,
			"deadline": "15m",
			"unreachable": "skip",
			"health": {"maxErrorRate": 0.05, "maxLatencyP99": "250ms"}
		}}`))
	if err != nil {
		t.Fatal(err)
	}
	st := s.Strategy
	if s.Slot != DefaultSlot || st.OnFailure != OnFailureRollback || st.Deadline.D() != 15*time.Minute || st.Unreachable != "skip" {
		t.Fatalf("spec = %+v", s)
	}
	if len(st.Waves) != 4 || st.Waves[1].Size != (Size{Count: 10}) || !st.Waves[2].Approval {
		t.Fatalf("waves = %+v", st.Waves)
	}
	// Waves inherit the strategy's soak and gates unless they set their own.
	if st.Waves[0].Soak.D() != 10*time.Minute || st.Waves[2].Soak.D() != time.Minute || len(st.Waves[0].Gates) != 2 || len(st.Waves[3].Gates) != 0 {
		t.Fatalf("per-wave settings = %+v", st.Waves)
	}
	if g := st.Waves[0].Gates[0]; g.MinInferences != DefaultMinInferences {
		t.Fatalf("gate defaults = %+v", g)
	}
	if s.Budget(200) != 4 || s.Budget(30) != 0 {
		t.Fatalf("budget of 2%%: %d of 200, %d of 30", s.Budget(200), s.Budget(30))
	}
	name, version := s.ModelRef()
	if name != "grid-anomaly" || version != "1.1.0" {
		t.Fatalf("ModelRef = %s %s", name, version)
	}
	// The normalized spec round-trips through JSON.
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := ParseSpec(b)
	if err != nil {
		t.Fatalf("normalized spec does not parse: %v\n%s", err, b)
	}
	b2, _ := json.Marshal(s2)
	if string(b) != string(b2) {
		t.Fatalf("round trip changed the spec:\n%s\n%s", b, b2)
	}
	// Defaults of an empty strategy.
	s, err = ParseSpec([]byte(`{"selector":"","model":"m@1"}`))
	if err != nil {
		t.Fatal(err)
	}
	if len(s.Strategy.Waves) != 1 || s.Strategy.Waves[0].Size.String() != "100%" || s.Strategy.Waves[0].Soak.D() != DefaultSoak ||
		s.Strategy.Deadline.D() != DefaultDeadline || s.Strategy.Unreachable != UnreachableFail || s.Budget(100) != 0 {
		t.Fatalf("defaults = %+v", s)
	}
}

func TestParseSpecRefuses(t *testing.T) {
	cases := []struct{ spec, want string }{
		{`{"selector":"a in (","model":"m@1"}`, "selector"},
		{`{"selector":"","model":"m"}`, "NAME@VERSION"},
		{`{"selector":"","model":"m@1@2"}`, "NAME@VERSION"},
		{`{"selector":"","model":"m@1","slot":"A B"}`, `slot "A B"`},
		{`{"selector":"","model":"m@1","name":"-x"}`, `name "-x"`},
		{`{"selector":"","model":"m@1","strategy":{"waves":["0%"]}}`, "at least one device"},
		{`{"selector":"","model":"m@1","strategy":{"waves":[0]}}`, "at least one device"},
		{`{"selector":"","model":"m@1","strategy":{"waves":[1.5]}}`, "whole number"},
		{`{"selector":"","model":"m@1","strategy":{"waves":[true]}}`, "device count or a percentage"},
		{`{"selector":"","model":"m@1","strategy":{"waves":[{"size":"5%","sizes":1}]}}`, `unknown field "sizes"`},
		{`{"selector":"","model":"m@1","strategy":{"waves":["50%","10%"]}}`, "below the wave before"},
		{`{"selector":"","model":"m@1","strategy":{"stratifyBy":"a,b"}}`, "one label key"},
		{`{"selector":"","model":"m@1","strategy":{"failureBudget":"200%"}}`, "percentage"},
		{`{"selector":"","model":"m@1","strategy":{"maxConcurrentDownloads":-1}}`, "maxConcurrentDownloads"},
		{`{"selector":"","model":"m@1","strategy":{"deadline":"-5m"}}`, "want a duration"},
		{`{"selector":"","model":"m@1","strategy":{"deadline":"1ns"}}`, "too short"},
		{`{"selector":"","model":"m@1","strategy":{"onFailure":"pray"}}`, "rollback or stop"},
		{`{"selector":"","model":"m@1","strategy":{"gates":[{"type":"errorRate","max":2}]}}`, "fraction from 0 to 1"},
		{`{"selector":"","model":"m@1","strategy":{"gates":[{"type":"latency"}]}}`, "maxP95Ratio and/or maxP99Ratio"},
		{`{"selector":"","model":"m@1","strategy":{"gates":[{"type":"shadowAgreement"}]}}`, "agreement floor"},
		{`{"selector":"","model":"m@1","strategy":{"gates":[{"type":"drift"}]}}`, "highest drift score"},
		{`{"selector":"","model":"m@1","strategy":{"gates":[{"type":"vibes"}]}}`, `unknown gate type "vibes"`},
		{`{"selector":"","model":"m@1","strategy":{"health":{"maxErrorRate":3}}}`, "maxErrorRate"},
		{`{"selector":"","model":"m@1"} {}`, "more than one"},
		{`[]`, "cannot unmarshal"},
		{`{"selector":"","model":"m@1","extra":1}`, `unknown field "extra"`},
	}
	for _, c := range cases {
		_, err := ParseSpec([]byte(c.spec))
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ParseSpec(%s) = %v, want ErrInvalid containing %q", c.spec, err, c.want)
		}
	}
	big := `{"selector":"` + strings.Repeat("a", MaxSpecSize) + `"}`
	if _, err := ParseSpec([]byte(big)); err == nil || !strings.Contains(err.Error(), "limit") {
		t.Errorf("oversized spec: %v", err)
	}
	// A gate type an engine registers is accepted by that engine only.
	spec := []byte(`{"selector":"","model":"m@1","strategy":{"gates":[{"type":"custom"}]}}`)
	if _, err := ParseSpecKnown(spec, func(t string) bool { return t == "custom" }); err != nil {
		t.Errorf("registered gate refused: %v", err)
	}
}

func FuzzParseSpec(f *testing.F) {
	f.Add([]byte(`{"selector":"region=eu","model":"m@1.0.0","strategy":{"waves":["1%",10,{"size":"100%","approval":true}],"soak":"1m"}}`))
	f.Add([]byte(`{"selector":"hw in (a,b),!lab","model":"x@2","strategy":{"gates":[{"type":"latency","maxP99Ratio":1.5}],"failureBudget":"5%"}}`))
	f.Add([]byte(`{"model":"m@1","strategy":{"waves":[1e300,"1e-9%"],"deadline":0}}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		s, err := ParseSpec(data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error does not wrap ErrInvalid: %v", err)
			}
			return
		}
		// Whatever is accepted plans without panicking and round-trips.
		ws := make([]Size, len(s.Strategy.Waves))
		for i, w := range s.Strategy.Waves {
			ws[i] = w.Size
		}
		counts, _ := WaveCounts(ws, 17)
		for i := 1; i < len(counts); i++ {
			if counts[i] <= counts[i-1] {
				t.Fatalf("wave counts %v do not grow", counts)
			}
		}
		b, err := json.Marshal(s)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseSpec(b); err != nil {
			t.Fatalf("accepted spec does not round-trip: %v\n%s", err, b)
		}
	})
}
