package selector

import (
	"errors"
	"strings"
	"testing"
)

func TestParseAndMatch(t *testing.T) {
	eu := map[string]string{"region": "eu", "hw": "jetson"}
	us := map[string]string{"region": "us", "hw": "rpi5", "lab": ""}
	bare := map[string]string{}
	cases := []struct {
		sel       string
		canonical string
		eu, us    bool
		bare      bool
	}{
		{"", "", true, true, true},
		{"   ", "", true, true, true},
		{"region=eu", "region=eu", true, false, false},
		{"region==eu", "region=eu", true, false, false},
		{"region = eu", "region=eu", true, false, false},
		{"region!=eu", "region!=eu", false, true, true},
		{"hw in (jetson,rpi5)", "hw in (jetson,rpi5)", true, true, false},
		{"hw in (rpi5, jetson, rpi5)", "hw in (jetson,rpi5)", true, true, false},
		{"hw in(jetson)", "hw in (jetson)", true, false, false},
		{"hw notin (jetson)", "hw notin (jetson)", false, true, true},
		{"lab", "lab", false, true, false},
		{"!lab", "!lab", true, false, true},
		{"! lab", "!lab", true, false, true},
		{"region=eu,hw in (jetson,rpi5),!lab", "region=eu,hw in (jetson,rpi5),!lab", true, false, false},
		{"region=eu , !lab", "region=eu,!lab", true, false, false},
		{"lab=", "lab=", false, true, false},
		{"lab!=", "lab!=", true, false, true},
		{"example.com/tier=gold", "example.com/tier=gold", false, false, false},
		{"in=in", "in=in", false, false, false},
		{"region", "region", true, true, false},
		{"region=eu,region=us", "region=eu,region=us", false, false, false},
		{"a-b.c_d=E-f.G_h", "a-b.c_d=E-f.G_h", false, false, false},
	}
	for _, c := range cases {
		t.Run(c.sel, func(t *testing.T) {
			sel, err := Parse(c.sel)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if got := sel.String(); got != c.canonical {
				t.Errorf("String() = %q, want %q", got, c.canonical)
			}
			for _, m := range []struct {
				name   string
				labels map[string]string
				want   bool
			}{{"eu", eu, c.eu}, {"us", us, c.us}, {"bare", bare, c.bare}} {
				if got := sel.Matches(m.labels); got != m.want {
					t.Errorf("Matches(%s %v) = %v, want %v", m.name, m.labels, got, m.want)
				}
			}
			if sel.Empty() != (c.canonical == "") {
				t.Errorf("Empty() = %v", sel.Empty())
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		sel  string
		want string
	}{
		{",", "position 1: expected a label key, got ','"},
		{"region=eu,", "position 11: expected a label key, got the end"},
		{"region=eu,,hw", "position 11: expected a label key, got ','"},
		{"=eu", "expected a label key, got '='"},
		{"!", "expected a label key after '!'"},
		{"!=x", "expected a label key, got '!='"},
		{"region=eu=us", "expected ',' or the end after \"region=eu\""},
		{"region eu", "expected one of '=', '==', '!=', 'in', 'notin'"},
		{"hw in jetson", "expected '(' after \"hw\" in"},
		{"hw in ()", "expected a value in the set of \"hw\""},
		{"hw in (a,)", "expected a value in the set of \"hw\""},
		{"hw in (a", "expected ',' or ')' in the set of \"hw\", got the end"},
		{"hw in (a b)", "expected ',' or ')'"},
		{"hw notin (a)x", "expected ',' or the end"},
		{"-region=eu", "label key \"-region\""},
		{"region=eu-", "label value \"eu-\""},
		{"region=" + strings.Repeat("x", 64), "label value"},
		{strings.Repeat("k", 64), "label key"},
		{"Example.com/x=y", "prefix before '/'"},
		{"a/b/c=d", "label key \"a/b/c\""},
		{"/x", "prefix before '/'"},
		{"!lab=x", "expected ',' or the end after \"!lab\""},
		{"region=(eu)", "expected a value after region="},
		{strings.Repeat("a", MaxLength+1), "limit is 4096"},
		{"région=eu", "label key"},
	}
	for _, c := range cases {
		t.Run(c.sel, func(t *testing.T) {
			_, err := Parse(c.sel)
			if err == nil {
				t.Fatalf("Parse(%q) accepted", c.sel)
			}
			if !errors.Is(err, ErrSyntax) {
				t.Errorf("error %v does not wrap ErrSyntax", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error = %q, want it to contain %q", err, c.want)
			}
		})
	}
}

func TestRequirements(t *testing.T) {
	sel := MustParse("b notin (y,x),!a")
	reqs := sel.Requirements()
	if len(reqs) != 2 || reqs[0].Key != "b" || reqs[0].Op != NotIn || strings.Join(reqs[0].Values, ",") != "x,y" ||
		reqs[1].Key != "a" || reqs[1].Op != DoesNotExist {
		t.Fatalf("Requirements() = %+v", reqs)
	}
	reqs[0].Key = "changed"
	if sel.Requirements()[0].Key != "b" {
		t.Fatal("Requirements() shares the selector's storage")
	}
	if !Everything().Matches(nil) {
		t.Fatal("Everything does not match nil labels")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"", "region=eu", "hw in (a,b),!lab", "k!=v", "x notin (q)", "a/b=c", "k==", "!x,y"} {
		f.Add(s, "region", "eu")
	}
	f.Fuzz(func(t *testing.T, s, k, v string) {
		sel, err := Parse(s)
		if err != nil {
			if !errors.Is(err, ErrSyntax) {
				t.Fatalf("error %v does not wrap ErrSyntax", err)
			}
			return
		}
		// The canonical form parses back to the same selector.
		again, err := Parse(sel.String())
		if err != nil {
			t.Fatalf("canonical form %q of %q does not parse: %v", sel.String(), s, err)
		}
		if again.String() != sel.String() {
			t.Fatalf("round trip %q -> %q -> %q", s, sel.String(), again.String())
		}
		labels := map[string]string{k: v}
		if sel.Matches(labels) != again.Matches(labels) {
			t.Fatalf("%q and its canonical form disagree on %v", s, labels)
		}
	})
}
