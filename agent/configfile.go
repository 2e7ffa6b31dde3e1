package agent

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// The configuration file is read by the small parser below instead of a
// YAML library: the agent's file is a flat mapping with three nested
// mappings (labels, health, shadow) and two lists of file names, and a
// general YAML decoder was 238 KB of the agent's binary (RATIONALE.md,
// "The agent's build flags"). It reads the YAML that such a file is
// written in: block mappings and block sequences ("- item"), flow
// sequences ([a, b]) and flow mappings ({k: v}) of scalars, plain,
// 'single' and "double" quoted scalars, comments, and a leading "---".
// What it does not read (anchors, aliases, tags, block scalars,
// multi-line scalars, deeper nesting) is an error that names the line,
// never a silent misreading. The keys are the yaml tags of Config,
// HealthConfig and ShadowConfig (a test checks that every tag has a
// setter here).

// yamlNode is a value in the file: a scalar, a sequence of scalars or a
// mapping of scalars. Null is a scalar written as nothing, ~ or null.
type yamlNode struct {
	line   int
	scalar string
	null   bool
	seq    []yamlNode
	isSeq  bool
	pairs  []yamlPair
	isMap  bool
}

type yamlPair struct {
	key   string
	value yamlNode
}

// yamlLine is one line with its comment and trailing blanks cut.
type yamlLine struct {
	n      int // 1-based
	indent int
	text   string // without the indentation
}

// parseYAMLMapping parses data, a mapping at the top, into its pairs in
// order.
func parseYAMLMapping(data []byte) ([]yamlPair, error) {
	var lines []yamlLine
	for i, raw := range strings.Split(string(data), "\n") {
		n := i + 1
		raw = strings.TrimSuffix(raw, "\r")
		if i := strings.IndexAny(raw, "\r\u0085\u2028\u2029"); i >= 0 {
			// YAML breaks lines at these too (yaml.v3 folds one inside a
			// quoted value into a space): refused rather than read apart
			// from YAML.
			return nil, fmt.Errorf("line %d: a line break character (%q) inside the line; end lines with \\n or \\r\\n only", n, []rune(raw[i:])[0])
		}
		text, err := cutComment(raw)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		text = strings.TrimRight(text, " \t")
		body := strings.TrimLeft(text, " ")
		if body == "" {
			continue
		}
		if strings.HasPrefix(body, "\t") {
			return nil, fmt.Errorf("line %d: a tab in the indentation; indent with spaces", n)
		}
		if body == "---" && len(lines) == 0 {
			continue
		}
		if body == "---" || body == "..." {
			return nil, fmt.Errorf("line %d: a second document; the file holds one mapping", n)
		}
		lines = append(lines, yamlLine{n: n, indent: len(text) - len(body), text: body})
	}
	var pairs []yamlPair
	seen := map[string]bool{}
	for i := 0; i < len(lines); {
		l := lines[i]
		if l.indent != 0 {
			return nil, fmt.Errorf("line %d: unexpected indentation", l.n)
		}
		key, rest, err := splitKey(l.text)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", l.n, err)
		}
		if seen[key] {
			return nil, fmt.Errorf("line %d: key %q is already set above", l.n, key)
		}
		seen[key] = true
		i++
		var v yamlNode
		if rest != "" {
			if v, err = parseInline(rest, l.n); err != nil {
				return nil, fmt.Errorf("line %d: %s: %w", l.n, key, err)
			}
		} else {
			// A block below: the lines indented deeper, or "- " items
			// at the key's own indentation, as YAML allows.
			j := i
			for j < len(lines) && (lines[j].indent > 0 || isItem(lines[j].text)) {
				j++
			}
			if v, err = parseBlock(lines[i:j], l.n); err != nil {
				return nil, fmt.Errorf("%s: %w", key, err)
			}
			i = j
		}
		pairs = append(pairs, yamlPair{key: key, value: v})
	}
	return pairs, nil
}

func isItem(s string) bool { return s == "-" || strings.HasPrefix(s, "- ") }

// parseBlock parses the lines below a key: nothing (null), a sequence of
// "- scalar" or a mapping of "key: scalar", all at one indentation.
func parseBlock(lines []yamlLine, keyLine int) (yamlNode, error) {
	if len(lines) == 0 {
		return yamlNode{line: keyLine, null: true}, nil
	}
	indent := lines[0].indent
	if isItem(lines[0].text) {
		v := yamlNode{line: lines[0].n, isSeq: true}
		for _, l := range lines {
			if l.indent != indent || !isItem(l.text) {
				return v, fmt.Errorf("line %d: expected a list item (\"- value\") indented as the first", l.n)
			}
			item, err := parseScalar(strings.TrimSpace(strings.TrimPrefix(l.text, "-")), l.n)
			if err != nil {
				return v, fmt.Errorf("line %d: %w", l.n, err)
			}
			v.seq = append(v.seq, item)
		}
		return v, nil
	}
	v := yamlNode{line: lines[0].n, isMap: true}
	seen := map[string]bool{}
	for _, l := range lines {
		if l.indent != indent {
			return v, fmt.Errorf("line %d: indented differently from line %d; only one level of nesting is read here", l.n, lines[0].n)
		}
		key, rest, err := splitKey(l.text)
		if err != nil {
			return v, fmt.Errorf("line %d: %w", l.n, err)
		}
		if seen[key] {
			return v, fmt.Errorf("line %d: key %q is already set above", l.n, key)
		}
		seen[key] = true
		val, err := parseScalar(rest, l.n)
		if err != nil {
			return v, fmt.Errorf("line %d: %s: %w", l.n, key, err)
		}
		v.pairs = append(v.pairs, yamlPair{key: key, value: val})
	}
	return v, nil
}

// parseInline parses a value on its key's line: a flow sequence, a flow
// mapping or a scalar.
func parseInline(s string, line int) (yamlNode, error) {
	switch s[0] {
	case '[':
		if !strings.HasSuffix(s, "]") {
			return yamlNode{}, errors.New("a [ list must end with ] on the same line")
		}
		items, err := splitFlow(s[1 : len(s)-1])
		if err != nil {
			return yamlNode{}, err
		}
		v := yamlNode{line: line, isSeq: true}
		for _, it := range items {
			item, err := parseScalar(it, line)
			if err != nil {
				return v, err
			}
			v.seq = append(v.seq, item)
		}
		return v, nil
	case '{':
		if !strings.HasSuffix(s, "}") {
			return yamlNode{}, errors.New("a { mapping must end with } on the same line")
		}
		items, err := splitFlow(s[1 : len(s)-1])
		if err != nil {
			return yamlNode{}, err
		}
		v := yamlNode{line: line, isMap: true}
		seen := map[string]bool{}
		for _, it := range items {
			key, rest, err := splitKeyIn(it, true)
			if err != nil {
				return v, err
			}
			if seen[key] {
				return v, fmt.Errorf("key %q is set twice", key)
			}
			seen[key] = true
			val, err := parseScalar(rest, line)
			if err != nil {
				return v, fmt.Errorf("%s: %w", key, err)
			}
			v.pairs = append(v.pairs, yamlPair{key: key, value: val})
		}
		return v, nil
	}
	return parseScalar(s, line)
}

// splitFlow splits the inside of [...] or {...} at the commas outside
// quotes; a trailing comma is allowed, nested brackets are not.
func splitFlow(s string) ([]string, error) {
	var items []string
	start := 0
	var quote byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote == '"' && c == '\\':
			i++
		case quote != 0:
			if c == quote {
				quote = 0
			}
		case c == '"' || c == '\'':
			quote = c
		case c == '[' || c == ']' || c == '{' || c == '}':
			return nil, errors.New("nested [ ] or { } are not read here; write one level")
		case c == ',':
			items = append(items, strings.TrimSpace(s[start:i]))
			start = i + 1
		}
	}
	if quote != 0 {
		return nil, errors.New("a quoted value is not closed")
	}
	// "[a, b,]": YAML allows the trailing comma; "[a, , b]" it does not.
	if last := strings.TrimSpace(s[start:]); last != "" {
		items = append(items, last)
	}
	for _, it := range items {
		if it == "" {
			return nil, errors.New("an empty entry between commas")
		}
	}
	return items, nil
}

// splitKey splits "key: rest" at the first ':' outside quotes that is
// followed by a blank or, outside a flow mapping, ends the line.
func splitKey(s string) (key, rest string, err error) { return splitKeyIn(s, false) }

// splitKeyIn is splitKey; in a flow mapping ({k: v}) a ':' must be
// followed by a blank, since YAML reads "{a:}" as the key "a:".
func splitKeyIn(s string, flow bool) (key, rest string, err error) {
	var quote byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote == '"' && c == '\\':
			i++
		case quote != 0:
			if c == quote {
				quote = 0
			}
		case (c == '"' || c == '\'') && i == 0:
			quote = c
		case c == ':' && ((i+1 == len(s) && !flow) || (i+1 < len(s) && (s[i+1] == ' ' || s[i+1] == '\t'))):
			k, err := parseScalar(strings.TrimSpace(s[:i]), 0)
			if err != nil {
				return "", "", fmt.Errorf("key %s: %w", s[:i], err)
			}
			if k.null || k.scalar == "" {
				return "", "", errors.New("an empty key")
			}
			return k.scalar, strings.TrimSpace(s[i+1:]), nil
		}
	}
	if isItem(s) {
		return "", "", fmt.Errorf("%q: a list item where a key was expected", s)
	}
	return "", "", fmt.Errorf("%q is not \"key: value\"", s)
}

// parseScalar reads a plain or quoted scalar.
func parseScalar(s string, line int) (yamlNode, error) {
	v := yamlNode{line: line}
	switch {
	case s == "" || s == "~" || s == "null" || s == "Null" || s == "NULL":
		v.null = true
		return v, nil
	case s[0] == '"':
		if len(s) < 2 || s[len(s)-1] != '"' {
			return v, fmt.Errorf("%s: a \" quote is not closed", s)
		}
		u, err := strconv.Unquote(s)
		if err != nil {
			return v, fmt.Errorf("%s: not a valid double-quoted value", s)
		}
		v.scalar = u
		return v, nil
	case s[0] == '\'':
		if len(s) < 2 || s[len(s)-1] != '\'' {
			return v, fmt.Errorf("%s: a ' quote is not closed", s)
		}
		inner := s[1 : len(s)-1]
		if strings.Count(strings.ReplaceAll(inner, "''", ""), "'") != 0 {
			return v, fmt.Errorf("%s: a ' inside single quotes is written ''", s)
		}
		v.scalar = strings.ReplaceAll(inner, "''", "'")
		return v, nil
	case strings.ContainsRune("&*!|>%@`[]{},", rune(s[0])) || isItem(s) || s == "?" || strings.HasPrefix(s, "? "):
		return v, fmt.Errorf("%s: anchors, aliases, tags, block scalars and nested values are not read here; quote the value if it is text", s)
	case strings.Contains(s, ": ") || strings.HasSuffix(s, ":"):
		return v, fmt.Errorf("%s: a value cannot hold \": \" unquoted; quote it", s)
	}
	v.scalar = s
	return v, nil
}

// cutComment removes a '#' comment (at the start or after a blank,
// outside quotes) from a line.
func cutComment(s string) (string, error) {
	var quote byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case quote == '"' && c == '\\':
			i++
		case quote != 0:
			if c == quote {
				quote = 0
			}
		case (c == '"' || c == '\'') && (i == 0 || strings.ContainsRune(" \t[{,:-", rune(s[i-1]))):
			quote = c
		case c == '#' && (i == 0 || s[i-1] == ' ' || s[i-1] == '\t'):
			return s[:i], nil
		}
	}
	return s, nil
}

// configSetters are the file's keys: each sets its field from a node.
// Nested mappings (health, shadow) have their own tables.
var configSetters = map[string]func(c *Config, v yamlNode) error{
	"id":                    str(func(c *Config) *string { return &c.ID }),
	"data":                  str(func(c *Config) *string { return &c.Data }),
	"broker":                str(func(c *Config) *string { return &c.Broker }),
	"controller":            str(func(c *Config) *string { return &c.Controller }),
	"listen":                str(func(c *Config) *string { return &c.Listen }),
	"log_level":             str(func(c *Config) *string { return &c.LogLevel }),
	"telemetry_compression": str(func(c *Config) *string { return &c.TelemetryCompression }),
	"tls_cert":              str(func(c *Config) *string { return &c.TLSCert }),
	"tls_key":               str(func(c *Config) *string { return &c.TLSKey }),
	"tls_ca":                str(func(c *Config) *string { return &c.TLSCA }),
	"spool_max_records":     uintField(func(c *Config) *uint64 { return &c.SpoolMaxRecords }),
	"spool_max_bytes":       uintField(func(c *Config) *uint64 { return &c.SpoolMaxBytes }),
	"memory_limit":          uintField(func(c *Config) *uint64 { return &c.MemoryLimit }),
	"aggregate_interval":    duration(func(c *Config) *time.Duration { return &c.AggregateInterval }),
	"update_deadline":       duration(func(c *Config) *time.Duration { return &c.UpdateDeadline }),
	"trim_after":            duration(func(c *Config) *time.Duration { return &c.TrimAfter }),
	"allow_unsigned":        boolean(func(c *Config) *bool { return &c.AllowUnsigned }),
	"release_keys":          list(func(c *Config) *[]string { return &c.ReleaseKeys }),
	"director_keys":         list(func(c *Config) *[]string { return &c.DirectorKeys }),
	"labels": func(c *Config, v yamlNode) error {
		if v.null {
			return nil
		}
		if !v.isMap {
			return errors.New("want a mapping of label keys to values, such as {region: eu}")
		}
		if c.Labels == nil {
			c.Labels = map[string]string{}
		}
		for _, p := range v.pairs {
			if p.value.null {
				return fmt.Errorf("%s has no value; write %s: '' for an empty one", p.key, p.key)
			}
			c.Labels[p.key] = p.value.scalar
		}
		return nil
	},
	"health": nested(func(c *Config) any { return &c.Health }, healthSetters),
	"shadow": nested(func(c *Config) any { return &c.Shadow }, shadowSetters),
}

var healthSetters = map[string]func(dst any, v yamlNode) error{
	"watch":           func(d any, v yamlNode) error { return setDuration(&d.(*HealthConfig).Watch, v) },
	"max_error_rate":  func(d any, v yamlNode) error { return setFloat(&d.(*HealthConfig).MaxErrorRate, v) },
	"max_latency_p99": func(d any, v yamlNode) error { return setDuration(&d.(*HealthConfig).MaxLatencyP99, v) },
	"min_inferences":  func(d any, v yamlNode) error { return setUint32(&d.(*HealthConfig).MinInferences, v) },
}

var shadowSetters = map[string]func(dst any, v yamlNode) error{
	"enabled":        func(d any, v yamlNode) error { return setBool(&d.(*ShadowConfig).Enabled, v) },
	"min_inferences": func(d any, v yamlNode) error { return setUint32(&d.(*ShadowConfig).MinInferences, v) },
	"max_duration":   func(d any, v yamlNode) error { return setDuration(&d.(*ShadowConfig).MaxDuration, v) },
	"min_agreement":  func(d any, v yamlNode) error { return setFloat(&d.(*ShadowConfig).MinAgreement, v) },
	"tolerance":      func(d any, v yamlNode) error { return setFloat(&d.(*ShadowConfig).Tolerance, v) },
}

// decodeConfigFile sets cfg's fields from the file's mapping. Keys not
// in the file keep cfg's values, as with a YAML decoder.
func decodeConfigFile(data []byte, cfg *Config) error {
	pairs, err := parseYAMLMapping(data)
	if err != nil {
		return err
	}
	for _, p := range pairs {
		set, ok := configSetters[p.key]
		if !ok {
			return fmt.Errorf("line %d: unknown key %q", p.value.line, p.key)
		}
		if err := set(cfg, p.value); err != nil {
			return fmt.Errorf("line %d: %s: %w", p.value.line, p.key, err)
		}
	}
	return nil
}

func nested(field func(*Config) any, setters map[string]func(any, yamlNode) error) func(*Config, yamlNode) error {
	return func(c *Config, v yamlNode) error {
		if v.null {
			return nil
		}
		if !v.isMap {
			return errors.New("want a mapping of settings below the key")
		}
		for _, p := range v.pairs {
			set, ok := setters[p.key]
			if !ok {
				return fmt.Errorf("unknown key %q", p.key)
			}
			if err := set(field(c), p.value); err != nil {
				return fmt.Errorf("%s: %w", p.key, err)
			}
		}
		return nil
	}
}

// scalarOf returns v's text, or ok false for null (which leaves the
// field as it was).
func scalarOf(v yamlNode) (string, bool, error) {
	if v.isSeq || v.isMap {
		return "", false, errors.New("want a single value, not a list or mapping")
	}
	return v.scalar, !v.null, nil
}

func str(field func(*Config) *string) func(*Config, yamlNode) error {
	return func(c *Config, v yamlNode) error {
		s, ok, err := scalarOf(v)
		if ok {
			*field(c) = s
		}
		return err
	}
}

func uintField(field func(*Config) *uint64) func(*Config, yamlNode) error {
	return func(c *Config, v yamlNode) error {
		s, ok, err := scalarOf(v)
		if err != nil || !ok {
			return err
		}
		n, err := strconv.ParseUint(s, 0, 64)
		if err != nil {
			return fmt.Errorf("%q is not a whole number", s)
		}
		*field(c) = n
		return nil
	}
}

func duration(field func(*Config) *time.Duration) func(*Config, yamlNode) error {
	return func(c *Config, v yamlNode) error { return setDuration(field(c), v) }
}

func boolean(field func(*Config) *bool) func(*Config, yamlNode) error {
	return func(c *Config, v yamlNode) error { return setBool(field(c), v) }
}

func list(field func(*Config) *[]string) func(*Config, yamlNode) error {
	return func(c *Config, v yamlNode) error {
		switch {
		case v.null:
			*field(c) = nil
			return nil
		case !v.isSeq:
			return errors.New("want a list, such as [a.pub, b.pub]")
		}
		out := make([]string, 0, len(v.seq))
		for _, it := range v.seq {
			if it.null {
				return errors.New("an empty list item; remove it or quote an empty name as ''")
			}
			out = append(out, it.scalar)
		}
		*field(c) = out
		return nil
	}
}

// setScalar parses a scalar value into dst; a null leaves dst as it was.
// parse's error says what the value should be.
func setScalar[T any](dst *T, v yamlNode, parse func(string) (T, error)) error {
	s, ok, err := scalarOf(v)
	if err != nil || !ok {
		return err
	}
	x, err := parse(s)
	if err != nil {
		return err
	}
	*dst = x
	return nil
}

func setDuration(dst *time.Duration, v yamlNode) error {
	return setScalar(dst, v, func(s string) (time.Duration, error) {
		d, err := time.ParseDuration(s)
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration; use e.g. 30s, 5m or 250ms", s)
		}
		return d, nil
	})
}

func setFloat(dst *float64, v yamlNode) error {
	return setScalar(dst, v, func(s string) (float64, error) {
		f, err := strconv.ParseFloat(s, 64)
		if err != nil || math.IsNaN(f) || math.IsInf(f, 0) {
			return 0, fmt.Errorf("%q is not a number", s)
		}
		return f, nil
	})
}

func setUint32(dst *uint32, v yamlNode) error {
	return setScalar(dst, v, func(s string) (uint32, error) {
		n, err := strconv.ParseUint(s, 0, 32)
		if err != nil {
			return 0, fmt.Errorf("%q is not a whole number up to %d", s, uint32(math.MaxUint32))
		}
		return uint32(n), nil
	})
}

func setBool(dst *bool, v yamlNode) error {
	return setScalar(dst, v, func(s string) (bool, error) {
		switch strings.ToLower(s) {
		case "true", "yes", "on":
			return true, nil
		case "false", "no", "off":
			return false, nil
		}
		return false, fmt.Errorf("%q is not true or false", s)
	})
}
