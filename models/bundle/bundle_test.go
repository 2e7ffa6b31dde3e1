package bundle

import (
	"archive/tar"
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func manifest() Manifest {
	return Manifest{
		ABI: 1, Name: "grid-anomaly", Version: "1.0.0",
		Inputs:  []TensorSpec{{Name: "readings", Datatype: "FP32", Shape: []int64{-1, 4}}},
		Outputs: []TensorSpec{{Name: "score", Datatype: "FP32", Shape: []int64{-1}}},
		Limits:  Limits{MemoryPages: 512, TimeoutMillis: 250},
		Tests: []TestVector{{
			Inputs:  []TensorValue{{Name: "readings", Datatype: "FP32", Shape: []int64{1, 4}, Data: []float64{230, 10, 50, 25}}},
			Outputs: []TensorValue{{Name: "score", Datatype: "FP32", Shape: []int64{1}, Data: []float64{0.02}}},
		}},
	}
}

var module = []byte("\x00asm\x01\x00\x00\x00 pretend module")

func TestRoundTrip(t *testing.T) {
	b, err := New(manifest(), module)
	if err != nil {
		t.Fatal(err)
	}
	enc, err := b.Encode()
	if err != nil {
		t.Fatal(err)
	}
	dec, err := Decode(enc)
	if err != nil {
		t.Fatal(err)
	}
	if dec.Digest != b.Digest || !reflect.DeepEqual(dec.Manifest, b.Manifest) || !bytes.Equal(dec.Module, module) || !bytes.Equal(dec.ManifestJSON, b.ManifestJSON) {
		t.Fatalf("round trip differs:\n%+v\n%+v", dec, b)
	}
	// Encoding is deterministic, so the digest names the content.
	again, _ := dec.Encode()
	if !bytes.Equal(again, enc) {
		t.Fatal("encoding the decoded bundle gives other bytes")
	}
	if got := b.Manifest.Limits.Timeout(time.Second); got != 250*time.Millisecond {
		t.Fatalf("Timeout = %v", got)
	}
	if got := (Limits{}).Timeout(time.Second); got != time.Second {
		t.Fatalf("default Timeout = %v", got)
	}
	// With a signature member.
	b.Signature = []byte("sig")
	enc, _ = b.Encode()
	dec, err = Decode(enc)
	if err != nil || string(dec.Signature) != "sig" {
		t.Fatalf("signed bundle: %v %q", err, dec.Signature)
	}
	// ReadFile, and its errors name the file.
	path := filepath.Join(t.TempDir(), "m.bundle")
	os.WriteFile(path, enc, 0o644)
	if _, err := ReadFile(path); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, enc[:100], 0o644)
	if _, err := ReadFile(path); err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("ReadFile of a broken file: %v", err)
	}
}

// archive writes members in order, as a hostile or broken tool might.
func archive(t *testing.T, members ...any) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for i := 0; i < len(members); i += 2 {
		name := members[i].(string)
		switch data := members[i+1].(type) {
		case []byte:
			tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg})
			tw.Write(data)
		case *tar.Header:
			tw.WriteHeader(data)
		}
	}
	tw.Close()
	return buf.Bytes()
}

func TestDecodeRefusals(t *testing.T) {
	good, _ := New(manifest(), module)
	mj := good.ManifestJSON
	other := append(append([]byte{}, module...), '!')
	withManifest := func(s string) []byte { return archive(t, ManifestName, []byte(s), ModuleName, module) }
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "needs both"},
		{"not tar", []byte("hello, this is not a tar archive at all, just some text padding it out........................................................................................................................................................................................................................................................................................................................................................................................................................................................................."), "not a bundle archive"},
		{"tampered module", archive(t, ManifestName, mj, ModuleName, other), "module was changed"},
		{"wrong order", archive(t, ModuleName, module, ManifestName, mj), "member 0"},
		{"missing module", archive(t, ManifestName, mj), "needs both"},
		{"extra member", archive(t, ManifestName, mj, ModuleName, module, SignatureName, []byte("s"), "x", []byte("y")), "member 3"},
		{"unknown member", archive(t, ManifestName, mj, "evil.sh", module), "member 1"},
		{"duplicate manifest", archive(t, ManifestName, mj, ManifestName, mj), "member 1"},
		{"path traversal", archive(t, "../"+ManifestName, mj, ModuleName, module), "member 0"},
		{"symlink", archive(t, ManifestName, &tar.Header{Name: ManifestName, Typeflag: tar.TypeSymlink, Linkname: "/etc/passwd"}), "regular file"},
		{"oversize manifest", archive(t, ManifestName, bytes.Repeat([]byte(" "), MaxManifestSize+1), ModuleName, module), "at most"},
		{"oversize signature", archive(t, ManifestName, mj, ModuleName, module, SignatureName, make([]byte, MaxSignatureSize+1)), "at most"},
		{"oversize bundle", make([]byte, MaxBundleSize+1), "limit"},
		{"manifest not json", withManifest("{"), ManifestName},
		{"manifest trailing data", archive(t, ManifestName, append(append([]byte{}, mj...), []byte(" {}")...), ModuleName, module), "after its JSON"},
		{"manifest unknown field", withManifest(strings.Replace(string(mj), `"abi"`, `"abbi": 1, "abi"`, 1)), "unknown field"},
		{"abi zero", withManifest(strings.Replace(string(mj), `"abi": 1`, `"abi": 0`, 1)), "abi is 0"},
		{"bad name", withManifest(strings.Replace(string(mj), `"grid-anomaly"`, `"Grid Anomaly"`, 1)), "manifest name"},
		{"bad version", withManifest(strings.Replace(string(mj), `"1.0.0"`, `"v1"`, 1)), "semantic version"},
		{"bad datatype", withManifest(strings.Replace(string(mj), `"FP32"`, `"float"`, 1)), "datatype"},
		{"bad dimension", withManifest(strings.Replace(string(mj), `-1,`, `-2,`, 1)), "dimension -2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Decode(tt.data)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want ErrInvalid containing %q", err, tt.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	tests := map[string]func(*Manifest){
		"no inputs":          func(m *Manifest) { m.Inputs = nil },
		"no outputs":         func(m *Manifest) { m.Outputs = nil },
		"unnamed tensor":     func(m *Manifest) { m.Inputs[0].Name = "" },
		"no datatype":        func(m *Manifest) { m.Outputs[0].Datatype = "" },
		"unknown datatype":   func(m *Manifest) { m.Outputs[0].Datatype = "BYTES" },
		"duplicate input":    func(m *Manifest) { m.Inputs = append(m.Inputs, m.Inputs[0]) },
		"negative dimension": func(m *Manifest) { m.Inputs[0].Shape = []int64{-5} },
		"long name":          func(m *Manifest) { m.Name = strings.Repeat("a", 64) },
		"abi negative":       func(m *Manifest) { m.ABI = -1 },
	}
	for name, change := range tests {
		m := manifest()
		change(&m)
		if _, err := New(m, module); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: New gave %v, want ErrInvalid", name, err)
		}
	}
	if _, err := New(manifest(), nil); !errors.Is(err, ErrInvalid) {
		t.Error("empty module accepted")
	}
}

// FuzzDecode: run with -fuzzminimizetime 0; minimizing the tar seeds is
// slow enough to look like a hang.
func FuzzDecode(f *testing.F) {
	good, _ := New(manifest(), module)
	enc, _ := good.Encode()
	f.Add(enc)
	good.Signature = []byte("signature")
	enc, _ = good.Encode()
	f.Add(enc)
	// Labels and reference histograms.
	rich, _ := New(classifier(), module)
	enc, _ = rich.Encode()
	f.Add(enc)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := Decode(data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error without ErrInvalid: %v", err)
			}
			return
		}
		// Whatever decodes is valid and re-encodes to a bundle that
		// decodes to the same thing.
		if err := b.Manifest.Validate(); err != nil {
			t.Fatal(err)
		}
		enc, err := b.Encode()
		if err != nil {
			t.Fatal(err)
		}
		again, err := Decode(enc)
		if err != nil {
			t.Fatalf("re-encoded bundle refused: %v", err)
		}
		if !reflect.DeepEqual(again.Manifest, b.Manifest) || !bytes.Equal(again.Module, b.Module) || !bytes.Equal(again.Signature, b.Signature) {
			t.Fatal("re-encoded bundle differs")
		}
	})
}
