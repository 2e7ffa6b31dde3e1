package agent

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
)

// yamlDecode is what ParseConfigFile did before configfile.go: yaml.v3
// with unknown keys refused. The tests hold the two to the same answers
// wherever both read a file.
func yamlDecode(data []byte, base Config) (Config, error) {
	cfg := base
	fileLabels := map[string]string{}
	cfg.Labels = nil
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return base, err
	}
	for k, v := range base.Labels {
		fileLabels[k] = v
	}
	for k, v := range cfg.Labels {
		fileLabels[k] = v
	}
	cfg.Labels = fileLabels
	return cfg, nil
}

// configFileSeeds are files written the ways the README and users write
// them; each must read the same as with yaml.v3.
var configFileSeeds = []string{
	"id: pos-17\ndata: /var/lib/edgefleet\nbroker: ssl://ctl.example:8883\ncontroller: https://ctl.example:8080\nrelease_keys: [/etc/edgefleet/release.pub]\ndirector_keys: [/etc/edgefleet/director.pub]\nlabels: {region: eu, hw: rpi5}\n",
	"---\n# the agent\nid: dev-7   # a comment\nlabels:\n  region: eu\n  hw: rpi5\nrelease_keys:\n  - a.pub\n  - 'b c.pub'\ndirector_keys:\n- d.pub\n",
	"health:\n  watch: 90s\n  max_error_rate: 0.02\n  max_latency_p99: 250ms\n  min_inferences: 50\nshadow:\n  enabled: true\n  min_inferences: 300\n  max_duration: 15m\n  min_agreement: 0.99\n  tolerance: 0.1\n",
	"id: \"quoted # not a comment\"\nlog_level: 'warn'\nspool_max_records: 5000\nspool_max_bytes: 0x100000\nmemory_limit: 33554432\naggregate_interval: 30s\ntelemetry_compression: off\nallow_unsigned: true\nupdate_deadline: 2m\ntrim_after: 0s\n",
	"labels: {}\nrelease_keys: []\nhealth: {watch: 1m, min_inferences: 7}\n",
	"id: x\r\nlabels:\r\n    a: 'it''s'\r\n    b: \"tab\\tthere\"\r\n",
	"\n\n# only comments\n\n",
	"id:\nlabels:\nrelease_keys:\n",
	"tls_cert: /etc/d.crt\ntls_key: /etc/d.key\ntls_ca: /etc/ca.crt\nlisten: 127.0.0.1:8181\n",
}

func TestConfigFileReadsAsYAML(t *testing.T) {
	base := DefaultConfig()
	base.Labels = map[string]string{"keep": "me"}
	for _, src := range configFileSeeds {
		got, err := ParseConfigFile([]byte(src), base)
		if err != nil {
			t.Errorf("%q: %v", src, err)
			continue
		}
		want, err := yamlDecode([]byte(src), base)
		if err != nil {
			t.Fatalf("%q: yaml.v3: %v", src, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%q:\n got %+v\nwant %+v", src, got, want)
		}
	}
	// Spot checks, so that the two cannot agree on nothing.
	cfg, err := ParseConfigFile([]byte(configFileSeeds[1]), DefaultConfig())
	if err != nil || cfg.ID != "dev-7" || cfg.Labels["hw"] != "rpi5" || !slices.Equal(cfg.ReleaseKeys, []string{"a.pub", "b c.pub"}) || !slices.Equal(cfg.DirectorKeys, []string{"d.pub"}) {
		t.Fatalf("block forms: %+v, %v", cfg, err)
	}
	cfg, err = ParseConfigFile([]byte(configFileSeeds[2]), DefaultConfig())
	if err != nil || cfg.Health.Watch != 90*time.Second || cfg.Shadow.MinAgreement != 0.99 || !cfg.Shadow.Enabled {
		t.Fatalf("nested: %+v, %v", cfg, err)
	}
}

func TestConfigFileErrors(t *testing.T) {
	cases := []struct{ name, src, want string }{
		{"unknown key", "id: a\nbrokr: tcp://x:1\n", `line 2: unknown key "brokr"`},
		{"unknown nested key", "shadow:\n  enabled: true\n  typo: 1\n", `unknown key "typo"`},
		{"number", "spool_max_records: lots\n", `"lots" is not a whole number`},
		{"duration", "health:\n  watch: soon\n", `line 2: health: watch: "soon" is not a duration`},
		{"bool", "allow_unsigned: maybe\n", `"maybe" is not true or false`},
		{"uint32", "shadow:\n  min_inferences: 4294967296\n", "min_inferences"},
		{"duplicate", "id: a\nid: b\n", `line 2: key "id" is already set above`},
		{"list wanted", "release_keys: a.pub\n", "want a list"},
		{"scalar wanted", "id: [a, b]\n", "want a single value"},
		{"anchor", "id: &a x\n", "anchors, aliases"},
		{"block scalar", "id: |\n  x\n", "block scalars"},
		{"deeper nesting", "health:\n  watch: 1m\n    x: 1\n", "only one level of nesting"},
		{"tab", "labels:\n\ta: b\n", "tab in the indentation"},
		{"second document", "id: a\n---\nid: b\n", "a second document"},
		{"carriage return alone", "id: x\nlabels:\n  a: 'b\rc'\n", "line 3: a line break character"},
		{"line separator", "id: x\u2028y\n", "line 1: a line break character"},
		{"not key value", "just text\n", `is not "key: value"`},
		{"unclosed flow", "release_keys: [a, b\n", "must end with ]"},
		{"nested flow", "release_keys: [[a]]\n", "nested"},
		{"unclosed quote", "id: \"abc\n", "quote is not closed"},
		{"indented top", "  id: a\n", "unexpected indentation"},
		{"colon in value", "id: a: b\n", `cannot hold ": "`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := ParseConfigFile([]byte(c.src), DefaultConfig())
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("err %v, want it to contain %q", err, c.want)
			}
		})
	}
}

// TestConfigFileKnowsEveryTag: every yaml tag of the configuration types
// has its setter, so a new field cannot be left out of the file.
func TestConfigFileKnowsEveryTag(t *testing.T) {
	tags := func(v any) []string {
		var out []string
		rt := reflect.TypeOf(v)
		for i := range rt.NumField() {
			if tag := rt.Field(i).Tag.Get("yaml"); tag != "" {
				out = append(out, tag)
			}
		}
		return out
	}
	for _, tag := range tags(Config{}) {
		if _, ok := configSetters[tag]; !ok {
			t.Errorf("Config's yaml key %q has no setter in configSetters", tag)
		}
		if !slices.Contains(configKeys(), tag) {
			t.Errorf("Config's yaml key %q is missing from configKeys", tag)
		}
	}
	if n, want := len(configSetters), len(tags(Config{})); n != want {
		t.Errorf("%d setters for %d keys", n, want)
	}
	for _, c := range []struct {
		v       any
		setters map[string]func(any, yamlNode) error
	}{{HealthConfig{}, healthSetters}, {ShadowConfig{}, shadowSetters}} {
		for _, tag := range tags(c.v) {
			if _, ok := c.setters[tag]; !ok {
				t.Errorf("%T's yaml key %q has no setter", c.v, tag)
			}
		}
		if n, want := len(c.setters), len(tags(c.v)); n != want {
			t.Errorf("%T: %d setters for %d keys", c.v, n, want)
		}
	}
}

// FuzzConfigFileMatchesYAML: the parser never panics, and whatever it reads,
// yaml.v3 reads the same way (where yaml.v3 reads the file at all; the
// parser may refuse what YAML allows, never read it differently).
func FuzzConfigFileMatchesYAML(f *testing.F) {
	for _, s := range configFileSeeds {
		f.Add([]byte(s))
	}
	f.Add([]byte("labels: {a: 'x, y', b: \"}\"}\n"))
	f.Add([]byte("release_keys: [a,]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		base := DefaultConfig()
		got, err := ParseConfigFile(data, base)
		if err != nil {
			return
		}
		_ = got.Validate()
		want, yerr := yamlDecode(data, base)
		if yerr != nil {
			return
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%q:\n got %+v\nwant %+v", data, got, want)
		}
	})
}
