// Package selector parses and evaluates label selectors over device labels,
// in the Kubernetes label selector grammar, so operators can target a group
// of devices the way they already target pods:
//
//	region=eu            label equals (also region==eu)
//	region!=eu           label differs or is absent
//	hw in (jetson,rpi5)  label is one of the values
//	hw notin (x86)       label is none of the values, or is absent
//	lab                  label exists
//	!lab                 label does not exist
//	region=eu,!lab       comma means AND
//
// The empty selector matches every device. Keys and values follow the
// Kubernetes syntax rules, so a selector that works here also works on any
// tool that speaks that grammar.
package selector

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// MaxLength caps the length of a selector string. Selectors come from API
// requests; nothing legitimate comes close.
const MaxLength = 4096

// ErrSyntax is wrapped by every parse error.
var ErrSyntax = errors.New("invalid label selector")

// Op is the operator of one requirement.
type Op int

// The operators of the grammar.
const (
	Equals       Op = iota // k=v, k==v
	NotEquals              // k!=v
	In                     // k in (a,b)
	NotIn                  // k notin (a,b)
	Exists                 // k
	DoesNotExist           // !k
)

// String returns the operator as written in a selector.
func (o Op) String() string {
	switch o {
	case Equals:
		return "="
	case NotEquals:
		return "!="
	case In:
		return "in"
	case NotIn:
		return "notin"
	case Exists:
		return "exists"
	case DoesNotExist:
		return "!"
	}
	return fmt.Sprintf("Op(%d)", int(o))
}

// Requirement is one comma-separated term of a selector.
type Requirement struct {
	Key string
	Op  Op
	// Values holds one value for Equals and NotEquals, one or more (sorted,
	// without duplicates) for In and NotIn, none otherwise.
	Values []string
}

// Matches reports whether labels satisfy the requirement.
func (r Requirement) Matches(labels map[string]string) bool {
	v, ok := labels[r.Key]
	switch r.Op {
	case Equals:
		return ok && v == r.Values[0]
	case NotEquals:
		return !ok || v != r.Values[0]
	case In:
		return ok && slices.Contains(r.Values, v)
	case NotIn:
		return !ok || !slices.Contains(r.Values, v)
	case Exists:
		return ok
	case DoesNotExist:
		return !ok
	}
	return false
}

// String returns the requirement in canonical form.
func (r Requirement) String() string {
	switch r.Op {
	case Equals, NotEquals:
		return r.Key + r.Op.String() + r.Values[0]
	case In, NotIn:
		return r.Key + " " + r.Op.String() + " (" + strings.Join(r.Values, ",") + ")"
	case Exists:
		return r.Key
	case DoesNotExist:
		return "!" + r.Key
	}
	return ""
}

// Selector is a parsed label selector: the AND of its requirements.
type Selector struct {
	reqs []Requirement
}

// Everything returns the selector that matches every label set.
func Everything() Selector { return Selector{} }

// Empty reports whether the selector has no requirement (matches everything).
func (s Selector) Empty() bool { return len(s.reqs) == 0 }

// Requirements returns a copy of the selector's requirements, in the order
// they were written.
func (s Selector) Requirements() []Requirement {
	return slices.Clone(s.reqs)
}

// Matches reports whether labels satisfy every requirement.
func (s Selector) Matches(labels map[string]string) bool {
	for _, r := range s.reqs {
		if !r.Matches(labels) {
			return false
		}
	}
	return true
}

// String returns the selector in canonical form; parsing it gives back an
// equal selector.
func (s Selector) String() string {
	parts := make([]string, len(s.reqs))
	for i, r := range s.reqs {
		parts[i] = r.String()
	}
	return strings.Join(parts, ",")
}

// Parse parses a selector. The error says where the selector went wrong and
// what was expected there.
func Parse(s string) (Selector, error) {
	if len(s) > MaxLength {
		return Selector{}, fmt.Errorf("%w: %d bytes long; the limit is %d", ErrSyntax, len(s), MaxLength)
	}
	p := &parser{lx: lexer{src: s}}
	p.next()
	var sel Selector
	if p.tok.kind == tEOF {
		return sel, nil
	}
	for {
		r, err := p.requirement()
		if err != nil {
			return Selector{}, fmt.Errorf("%w %q: %w", ErrSyntax, s, err)
		}
		sel.reqs = append(sel.reqs, r)
		switch p.tok.kind {
		case tEOF:
			return sel, nil
		case tComma:
			p.next()
		default:
			return Selector{}, fmt.Errorf("%w %q: %s: expected ',' or the end after %q", ErrSyntax, s, p.tok.where(), r.String())
		}
	}
}

// MustParse is Parse for selectors known to be valid (tests, constants); it
// panics on error.
func MustParse(s string) Selector {
	sel, err := Parse(s)
	if err != nil {
		panic(err)
	}
	return sel
}

type parser struct {
	lx  lexer
	tok token
}

func (p *parser) next() { p.tok = p.lx.next() }

func (p *parser) requirement() (Requirement, error) {
	if p.tok.kind == tNot {
		p.next()
		if p.tok.kind != tIdent {
			return Requirement{}, fmt.Errorf("%s: expected a label key after '!', got %s", p.tok.where(), p.tok.describe())
		}
		if err := validKey(p.tok.text); err != nil {
			return Requirement{}, fmt.Errorf("%s: %w", p.tok.where(), err)
		}
		r := Requirement{Key: p.tok.text, Op: DoesNotExist}
		p.next()
		return r, nil
	}
	if p.tok.kind != tIdent {
		return Requirement{}, fmt.Errorf("%s: expected a label key, got %s", p.tok.where(), p.tok.describe())
	}
	if err := validKey(p.tok.text); err != nil {
		return Requirement{}, fmt.Errorf("%s: %w", p.tok.where(), err)
	}
	r := Requirement{Key: p.tok.text}
	p.next()
	switch {
	case p.tok.kind == tEOF || p.tok.kind == tComma:
		r.Op = Exists
		return r, nil
	case p.tok.kind == tEq || p.tok.kind == tEqEq || p.tok.kind == tNotEq:
		r.Op = Equals
		if p.tok.kind == tNotEq {
			r.Op = NotEquals
		}
		p.next()
		// An empty value is allowed (k= matches a label set to ""), as in
		// Kubernetes.
		v := ""
		if p.tok.kind == tIdent {
			v = p.tok.text
			if err := validValue(v); err != nil {
				return Requirement{}, fmt.Errorf("%s: %w", p.tok.where(), err)
			}
			p.next()
		} else if p.tok.kind != tEOF && p.tok.kind != tComma {
			return Requirement{}, fmt.Errorf("%s: expected a value after %s%s, got %s", p.tok.where(), r.Key, r.Op, p.tok.describe())
		}
		r.Values = []string{v}
		return r, nil
	case p.tok.kind == tIdent && (p.tok.text == "in" || p.tok.text == "notin"):
		r.Op = In
		if p.tok.text == "notin" {
			r.Op = NotIn
		}
		p.next()
		vals, err := p.set(r)
		if err != nil {
			return Requirement{}, err
		}
		r.Values = vals
		return r, nil
	}
	return Requirement{}, fmt.Errorf("%s: expected one of '=', '==', '!=', 'in', 'notin', ',' or the end after key %q, got %s", p.tok.where(), r.Key, p.tok.describe())
}

// set parses "(v1, v2, ...)" after in / notin.
func (p *parser) set(r Requirement) ([]string, error) {
	if p.tok.kind != tOpen {
		return nil, fmt.Errorf("%s: expected '(' after %q %s, got %s", p.tok.where(), r.Key, r.Op, p.tok.describe())
	}
	p.next()
	var vals []string
	for {
		if p.tok.kind != tIdent {
			return nil, fmt.Errorf("%s: expected a value in the set of %q, got %s (write at least one value, like %s %s (a,b))", p.tok.where(), r.Key, p.tok.describe(), r.Key, r.Op)
		}
		if err := validValue(p.tok.text); err != nil {
			return nil, fmt.Errorf("%s: %w", p.tok.where(), err)
		}
		vals = append(vals, p.tok.text)
		p.next()
		switch p.tok.kind {
		case tComma:
			p.next()
		case tClose:
			p.next()
			slices.Sort(vals)
			return slices.Compact(vals), nil
		default:
			return nil, fmt.Errorf("%s: expected ',' or ')' in the set of %q, got %s", p.tok.where(), r.Key, p.tok.describe())
		}
	}
}

type tokKind int

const (
	tEOF tokKind = iota
	tIdent
	tNot   // !
	tEq    // =
	tEqEq  // ==
	tNotEq // !=
	tComma
	tOpen
	tClose
)

type token struct {
	kind tokKind
	text string
	pos  int // byte offset, for error messages
}

func (t token) where() string { return fmt.Sprintf("at position %d", t.pos+1) }

func (t token) describe() string {
	switch t.kind {
	case tEOF:
		return "the end of the selector"
	case tIdent:
		return fmt.Sprintf("%q", t.text)
	}
	return fmt.Sprintf("'%s'", t.text)
}

type lexer struct {
	src string
	pos int
}

// isSpecial reports the bytes that end an identifier.
func isSpecial(c byte) bool {
	switch c {
	case ' ', '\t', '\n', '\r', '!', '=', ',', '(', ')':
		return true
	}
	return false
}

func (l *lexer) next() token {
	for l.pos < len(l.src) && strings.IndexByte(" \t\n\r", l.src[l.pos]) >= 0 {
		l.pos++
	}
	start := l.pos
	if l.pos >= len(l.src) {
		return token{kind: tEOF, pos: start}
	}
	two := func(k tokKind) token {
		l.pos += 2
		return token{kind: k, text: l.src[start:l.pos], pos: start}
	}
	one := func(k tokKind) token {
		l.pos++
		return token{kind: k, text: l.src[start:l.pos], pos: start}
	}
	c := l.src[l.pos]
	switch c {
	case '!':
		if strings.HasPrefix(l.src[l.pos:], "!=") {
			return two(tNotEq)
		}
		return one(tNot)
	case '=':
		if strings.HasPrefix(l.src[l.pos:], "==") {
			return two(tEqEq)
		}
		return one(tEq)
	case ',':
		return one(tComma)
	case '(':
		return one(tOpen)
	case ')':
		return one(tClose)
	}
	for l.pos < len(l.src) && !isSpecial(l.src[l.pos]) {
		l.pos++
	}
	return token{kind: tIdent, text: l.src[start:l.pos], pos: start}
}

// validName checks a label name or value body: at most 63 characters,
// alphanumerics at both ends, '-', '_' and '.' inside.
func validName(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if alnum {
			continue
		}
		if (c == '-' || c == '_' || c == '.') && i > 0 && i < len(s)-1 {
			continue
		}
		return false
	}
	return true
}

// validDNSSubdomain checks a key prefix: lowercase RFC 1123 labels joined by
// dots, at most 253 characters.
func validDNSSubdomain(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if len(label) == 0 || len(label) > 63 {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' && i > 0 && i < len(label)-1 {
				continue
			}
			return false
		}
	}
	return true
}

func validKey(k string) error {
	prefix, name, hasPrefix := strings.Cut(k, "/")
	if !hasPrefix {
		name, prefix = prefix, ""
	}
	if hasPrefix && !validDNSSubdomain(prefix) {
		return fmt.Errorf("label key %q: the prefix before '/' must be a lowercase DNS name such as example.com", k)
	}
	if !validName(name) {
		return fmt.Errorf("label key %q: use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit", k)
	}
	return nil
}

func validValue(v string) error {
	if v != "" && !validName(v) {
		return fmt.Errorf("label value %q: use at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit", v)
	}
	return nil
}
