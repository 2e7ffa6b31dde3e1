package compiler

import (
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
)

// Limits of ReadTable.
const (
	// MaxTableSize is the largest CSV file read.
	MaxTableSize = 256 << 20
	// MaxTableColumns is the most columns a row may have.
	MaxTableColumns = 1 << 16
)

// ErrTable is wrapped by every error about a malformed CSV table.
var ErrTable = errors.New("invalid csv table")

// Table is rows of numbers read from CSV: an optional header naming the
// columns, then one row per line. An empty cell (or NA, NaN) is a missing
// value, held as NaN.
type Table struct {
	// Source names the table in errors (usually its file name).
	Source string
	// Columns holds the header, or nil when the first line was numbers.
	Columns []string
	Rows    [][]float32
	// Lines holds each row's line number in the source, for errors.
	Lines []int
}

// ReadTableFile reads a CSV file.
func ReadTableFile(path string) (*Table, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return ReadTable(f, path)
}

// ReadTable reads CSV from r; source names it in errors. The first line is
// a header when any of its cells is neither a number nor empty.
func ReadTable(r io.Reader, source string) (*Table, error) {
	lr := &io.LimitedReader{R: r, N: MaxTableSize + 1}
	cr := csv.NewReader(lr)
	cr.FieldsPerRecord = -1
	cr.ReuseRecord = true
	cr.TrimLeadingSpace = true
	t := &Table{Source: source}
	width := -1
	for first := true; ; first = false {
		rec, err := cr.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrTable, source, err)
		}
		line, _ := cr.FieldPos(0)
		if lr.N <= 0 {
			return nil, fmt.Errorf("%w: %s is over the %d byte limit", ErrTable, source, MaxTableSize)
		}
		if len(rec) > MaxTableColumns {
			return nil, fmt.Errorf("%w: %s line %d has %d columns, over the limit of %d", ErrTable, source, line, len(rec), MaxTableColumns)
		}
		if first && isHeader(rec) {
			t.Columns = make([]string, len(rec))
			for i, c := range rec {
				t.Columns[i] = strings.TrimSpace(c)
			}
			width = len(rec)
			continue
		}
		if width >= 0 && len(rec) != width {
			return nil, fmt.Errorf("%w: %s line %d has %d columns, the lines before it %d", ErrTable, source, line, len(rec), width)
		}
		width = len(rec)
		row := make([]float32, len(rec))
		for i, c := range rec {
			v, err := parseCell(c)
			if err != nil {
				return nil, fmt.Errorf("%w: %s line %d column %d: %v", ErrTable, source, line, i+1, err)
			}
			row[i] = v
		}
		t.Rows = append(t.Rows, row)
		t.Lines = append(t.Lines, line)
	}
	return t, nil
}

func isHeader(rec []string) bool {
	for _, c := range rec {
		if _, err := parseCell(c); err != nil {
			return true
		}
	}
	return false
}

// parseCell reads one cell: a number, or empty / NA / NaN for missing.
func parseCell(c string) (float32, error) {
	c = strings.TrimSpace(c)
	switch strings.ToLower(c) {
	case "", "na", "nan", "null":
		return float32(math.NaN()), nil
	}
	v, err := strconv.ParseFloat(c, 32)
	if err != nil {
		// ParseFloat reports out-of-range values with ±Inf and an error;
		// a number too large for float32 is still not a usable input.
		return 0, fmt.Errorf("%q is not a float32 number or an empty (missing) cell", c)
	}
	return float32(v), nil
}

// Width returns the number of columns.
func (t *Table) Width() int {
	if t.Columns != nil {
		return len(t.Columns)
	}
	if len(t.Rows) > 0 {
		return len(t.Rows[0])
	}
	return 0
}

// Select returns the rows with their columns in the order of names. With a
// header, columns are matched by name (extra columns are ignored); without
// one, the table must have exactly len(names) columns, taken in order.
func (t *Table) Select(names []string) ([][]float32, error) {
	if t.Columns == nil {
		if w := t.Width(); w != len(names) && len(t.Rows) > 0 {
			return nil, fmt.Errorf("%w: %s has %d columns but the model takes %d features (%s); give one column per feature, or a header naming them",
				ErrTable, t.Source, w, len(names), abbreviate(names))
		}
		return t.Rows, nil
	}
	pos := make(map[string]int, len(t.Columns))
	for i, c := range t.Columns {
		if _, dup := pos[c]; dup {
			return nil, fmt.Errorf("%w: %s names column %q twice", ErrTable, t.Source, c)
		}
		pos[c] = i
	}
	idx := make([]int, len(names))
	inOrder := len(t.Columns) == len(names)
	var missing []string
	for i, n := range names {
		j, ok := pos[n]
		if !ok {
			missing = append(missing, n)
			continue
		}
		idx[i] = j
		inOrder = inOrder && i == j
	}
	if len(missing) > 0 {
		// A header that names none of the features is taken to be just
		// labels, when the count fits.
		if len(missing) == len(names) && len(t.Columns) == len(names) {
			return t.Rows, nil
		}
		return nil, fmt.Errorf("%w: %s has no column %s; the model's features are %s", ErrTable, t.Source, abbreviate(missing), abbreviate(names))
	}
	if inOrder {
		return t.Rows, nil
	}
	out := make([][]float32, len(t.Rows))
	for r, row := range t.Rows {
		o := make([]float32, len(names))
		for i, j := range idx {
			o[i] = row[j]
		}
		out[r] = o
	}
	return out, nil
}

// abbreviate lists names, eliding the middle of a long list.
func abbreviate(names []string) string {
	q := make([]string, 0, 7)
	for i, n := range names {
		if len(names) > 6 && i == 3 {
			q = append(q, fmt.Sprintf("... (%d more) ...", len(names)-5))
		}
		if len(names) > 6 && i >= 3 && i < len(names)-2 {
			continue
		}
		q = append(q, strconv.Quote(n))
	}
	return strings.Join(q, ", ")
}
