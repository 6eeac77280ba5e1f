// spmac_system: the DRAM-fed accelerator. Weights stream from DRAM over an AXI4 read master, through a
// FIFO that lets the fetch run ahead of the array; a sequencer walks a descriptor table in DRAM and runs
// a sequence of layers with no host between them; activations come in and results go out over AXI-Stream.
//
//   start (table, layers, tokens) -> spmac_fetch -> axi_read_master -> AXI4 AR/R
//        R (tag 1: descriptors) -> spmac_fetch;  R (tag 0: weights) -> axis_fifo
//        -> spmac_wsplit -> axis_resize (scale words) -> axis_fifo -> spmac_core
//                        -> axis_resize (weight words) -------------> spmac_core <- s_axis activations
//   spmac_core -> m_axis results (one P-wide beat per row pass, tlast on a token's last pass)
//
// `rd_beats` counts R beats (bytes read = rd_beats * DATA_W/8). err: {desc, tlast, rlast, rresp}.

`default_nettype none

module spmac_system #(
    parameter int P          = spmac_pkg::P,
    parameter int N          = spmac_pkg::N,
    parameter int M          = spmac_pkg::M,
    parameter int G          = spmac_pkg::G,
    parameter int WB         = spmac_pkg::WB,
    parameter int AB         = spmac_pkg::AB,
    parameter int SCW        = spmac_pkg::SCW,
    parameter int OUTW       = spmac_pkg::OUTW,
    parameter int SHW        = spmac_pkg::SHW,
    parameter int MAX_SHIFT  = spmac_pkg::MAX_SHIFT,
    parameter int BPR_MAX    = 128,      // k_max / (G*M)
    parameter int ADDR_W     = 32,
    parameter int DATA_W     = 512,      // AXI data bits
    parameter int MAX_BURST  = 16,
    parameter int MAX_OUTSTANDING = 4,
    parameter int FIFO_DEPTH = 128,      // weight FIFO, in bus words
    parameter int LAYER_W    = 16,
    parameter int TOK_W      = 16,
    parameter int PASS_W     = 16
) (
    input  wire logic                   clk,
    input  wire logic                   rst_n,
    // run control
    input  wire logic                   start_valid,
    output      logic                   start_ready,
    input  wire logic [ADDR_W-1:0]      start_table,
    input  wire logic [LAYER_W-1:0]     start_layers,
    input  wire logic [TOK_W-1:0]       start_tokens,
    output      logic                   done,
    output      logic [3:0]             err,
    output      logic [31:0]            rd_beats,
    // AXI4 read master (weights, scales, descriptors)
    output      logic [0:0]             m_axi_arid,
    output      logic [ADDR_W-1:0]      m_axi_araddr,
    output      logic [7:0]             m_axi_arlen,
    output      logic [2:0]             m_axi_arsize,
    output      logic [1:0]             m_axi_arburst,
    output      logic [3:0]             m_axi_arcache,
    output      logic [2:0]             m_axi_arprot,
    output      logic                   m_axi_arvalid,
    input  wire logic                   m_axi_arready,
    input  wire logic [0:0]             m_axi_rid,
    input  wire logic [DATA_W-1:0]      m_axi_rdata,
    input  wire logic [1:0]             m_axi_rresp,
    input  wire logic                   m_axi_rlast,
    input  wire logic                   m_axi_rvalid,
    output      logic                   m_axi_rready,
    // activations in
    input  wire logic                   s_axis_tvalid,
    output      logic                   s_axis_tready,
    input  wire logic [G*M*AB-1:0]      s_axis_tdata,
    input  wire logic                   s_axis_tlast,
    // results out
    output      logic                   m_axis_tvalid,
    input  wire logic                   m_axis_tready,
    output      logic [P*OUTW-1:0]      m_axis_tdata,
    output      logic                   m_axis_tlast
);
    import spmac_pkg::PSW, spmac_pkg::GACCW, spmac_pkg::SPW, spmac_pkg::TOTW;
    localparam int BPG    = spmac_pkg::BPG;                // beats per quantization group: the design's
    localparam int IDXW   = (M > 1) ? $clog2(M) : 1;
    localparam int WW     = P * G * N * (WB + IDXW);     // a weight word's bits
    localparam int WBYTES = (WW + 7) / 8;
    localparam int SW     = P * SCW;                     // a scale word's bits
    localparam int SBYTES = (SW + 7) / 8;
    localparam int DB     = DATA_W / 8;
    localparam int LEN_W  = 32;
    localparam int BPR_W  = 16;
    localparam int SPACE_W = $clog2(FIFO_DEPTH + 1);
    localparam int SFIFO  = 1 << $clog2(2 * (BPR_MAX / BPG) + 2);   // two passes of scale words

    initial begin
        if (DATA_W > 512) $fatal(1, "spmac_system: DATA_W=%0d: the image aligns to 64 bytes, so at most 512", DATA_W);
        if (spmac_pkg::BPR > BPR_MAX || spmac_pkg::PASSES >= (1 << PASS_W))
            $fatal(1, "spmac_system: the package's default layer does not fit BPR_MAX / PASS_W");
        if (FIFO_DEPTH < MAX_BURST) $fatal(1, "spmac_system: FIFO_DEPTH %0d cannot hold one burst", FIFO_DEPTH);
    end

    // ---- fetch sequencer and read master -------------------------------------------------------------
    logic cmd_valid, cmd_ready, cmd_tag;
    logic [ADDR_W-1:0] cmd_addr;
    logic [LEN_W-1:0]  cmd_bytes;
    logic rd_valid, rd_ready, rd_tag, rd_last;
    logic [DATA_W-1:0] rd_data;
    logic desc_ready, fifo_s_ready;
    logic [SPACE_W-1:0] fifo_count;
    logic [1:0] rd_err;
    logic fetch_busy, err_desc, err_tlast;

    logic cfg_valid, cfg_ready, cfg_last;
    logic [TOK_W-1:0]  cfg_tokens;
    logic [PASS_W-1:0] cfg_passes;
    logic [BPR_W-1:0]  cfg_bpr;
    logic [SHW-1:0]    cfg_shift;
    logic [LEN_W-1:0]  cfg_sbytes, cfg_sstride, cfg_wbytes, cfg_wstride;

    spmac_fetch #(.ADDR_W(ADDR_W), .DATA_W(DATA_W), .LEN_W(LEN_W), .LAYER_W(LAYER_W), .TOK_W(TOK_W),
                  .PASS_W(PASS_W), .BPR_W(BPR_W), .SHW(SHW), .BPR_MAX(BPR_MAX), .PASSES_MAX((1 << PASS_W) - 1),
                  .BPG(BPG), .MAX_SHIFT(MAX_SHIFT), .WBYTES(WBYTES), .SBYTES(SBYTES)) u_fetch (
        .clk, .rst_n,
        .start_valid, .start_ready, .start_table, .start_layers, .start_tokens,
        .m_cmd_valid(cmd_valid), .m_cmd_ready(cmd_ready), .m_cmd_addr(cmd_addr), .m_cmd_bytes(cmd_bytes),
        .m_cmd_tag(cmd_tag),
        .s_desc_valid(rd_valid && rd_tag), .s_desc_ready(desc_ready), .s_desc_data(rd_data),
        .m_cfg_valid(cfg_valid), .m_cfg_ready(cfg_ready), .m_cfg_last(cfg_last), .m_cfg_tokens(cfg_tokens),
        .m_cfg_passes(cfg_passes), .m_cfg_bpr(cfg_bpr), .m_cfg_shift(cfg_shift), .m_cfg_sbytes(cfg_sbytes),
        .m_cfg_sstride(cfg_sstride), .m_cfg_wbytes(cfg_wbytes), .m_cfg_wstride(cfg_wstride),
        .busy(fetch_busy), .err_desc
    );

    axi_read_master #(.ADDR_W(ADDR_W), .DATA_W(DATA_W), .ID_W(1), .LEN_W(LEN_W), .TAG_W(1),
                      .MAX_BURST(MAX_BURST), .MAX_OUTSTANDING(MAX_OUTSTANDING), .SPACE_W(SPACE_W)) u_rd (
        .clk, .rst_n,
        .s_cmd_valid(cmd_valid), .s_cmd_ready(cmd_ready), .s_cmd_addr(cmd_addr), .s_cmd_bytes(cmd_bytes),
        .s_cmd_tag(cmd_tag), .space(SPACE_W'(FIFO_DEPTH) - fifo_count),
        .m_axi_arid, .m_axi_araddr, .m_axi_arlen, .m_axi_arsize, .m_axi_arburst, .m_axi_arcache, .m_axi_arprot,
        .m_axi_arvalid, .m_axi_arready, .m_axi_rid, .m_axi_rdata, .m_axi_rresp, .m_axi_rlast, .m_axi_rvalid,
        .m_axi_rready,
        .m_axis_tvalid(rd_valid), .m_axis_tready(rd_ready), .m_axis_tdata(rd_data), .m_axis_tuser(rd_tag),
        .m_axis_tlast(rd_last), .err(rd_err)
    );
    assign rd_ready = rd_tag ? desc_ready : fifo_s_ready;

    always_ff @(posedge clk or negedge rst_n)
        if (!rst_n) rd_beats <= '0;
        else if (m_axi_rvalid && m_axi_rready) rd_beats <= rd_beats + 1'b1;

    // ---- the weight FIFO: fetch runs ahead of the array by up to FIFO_DEPTH bus words ------------------
    logic wf_valid, wf_ready;
    logic [DATA_W-1:0] wf_data;
    axis_fifo #(.W(DATA_W), .DEPTH(FIFO_DEPTH)) u_wfifo (
        .clk, .rst_n,
        .s_valid(rd_valid && !rd_tag), .s_ready(fifo_s_ready), .s_data(rd_data),
        .m_valid(wf_valid), .m_ready(wf_ready), .m_data(wf_data), .count(fifo_count)
    );

    // ---- the layer's geometry goes to the splitter and the core through their own queues --------------
    localparam int SPLIT_CFG = TOK_W + PASS_W + 4 * LEN_W;
    localparam int CORE_CFG  = 1 + TOK_W + PASS_W + BPR_W + SHW;
    logic sq_ready, cq_ready, sq_valid, cq_valid, sq_take, cq_take;
    logic [SPLIT_CFG-1:0] sq_data;
    logic [CORE_CFG-1:0]  cq_data;
    logic [1:0] unused_sq_count, unused_cq_count;   // occupancies no producer here needs
    assign cfg_ready = sq_ready && cq_ready;
    axis_fifo #(.W(SPLIT_CFG), .DEPTH(2)) u_split_cfg (
        .clk, .rst_n, .s_valid(cfg_valid && cq_ready), .s_ready(sq_ready),
        .s_data({cfg_tokens, cfg_passes, cfg_sbytes, cfg_sstride, cfg_wbytes, cfg_wstride}),
        .m_valid(sq_valid), .m_ready(sq_take), .m_data(sq_data), .count(unused_sq_count)
    );
    axis_fifo #(.W(CORE_CFG), .DEPTH(2)) u_core_cfg (
        .clk, .rst_n, .s_valid(cfg_valid && sq_ready), .s_ready(cq_ready),
        .s_data({cfg_last, cfg_tokens, cfg_passes, cfg_bpr, cfg_shift}),
        .m_valid(cq_valid), .m_ready(cq_take), .m_data(cq_data), .count(unused_cq_count)
    );

    // ---- split the region into scale and weight words ------------------------------------------------
    logic sc_valid, sc_ready, wt_valid, wt_ready;
    logic [DATA_W-1:0] sc_data, wt_data;
    logic [DB-1:0] sc_keep, wt_keep;
    spmac_wsplit #(.DATA_W(DATA_W), .LEN_W(LEN_W), .TOK_W(TOK_W), .PASS_W(PASS_W)) u_split (
        .clk, .rst_n,
        .s_cfg_valid(sq_valid), .s_cfg_ready(sq_take),
        .s_cfg_tokens(sq_data[SPLIT_CFG-1 -: TOK_W]), .s_cfg_passes(sq_data[4*LEN_W +: PASS_W]),
        .s_cfg_sbytes(sq_data[3*LEN_W +: LEN_W]), .s_cfg_sstride(sq_data[2*LEN_W +: LEN_W]),
        .s_cfg_wbytes(sq_data[LEN_W +: LEN_W]), .s_cfg_wstride(sq_data[0 +: LEN_W]),
        .s_valid(wf_valid), .s_ready(wf_ready), .s_data(wf_data),
        .m_scale_valid(sc_valid), .m_scale_ready(sc_ready), .m_scale_data(sc_data), .m_scale_keep(sc_keep),
        .m_weight_valid(wt_valid), .m_weight_ready(wt_ready), .m_weight_data(wt_data), .m_weight_keep(wt_keep)
    );

    logic sw_valid, sw_ready, ss_valid, ss_ready, sf_valid, sf_ready, ww_valid, ww_ready;
    logic [SBYTES*8-1:0] sw_data, sf_data;
    logic [$clog2(SFIFO+1)-1:0] unused_sf_count;
    logic [WBYTES*8-1:0] ww_data;
    axis_resize #(.IN_BYTES(DB), .OUT_BYTES(SBYTES)) u_scale_words (
        .clk, .rst_n, .s_valid(sc_valid), .s_ready(sc_ready), .s_data(sc_data), .s_keep(sc_keep),
        .m_valid(sw_valid), .m_ready(sw_ready), .m_data(sw_data)
    );
    // a pass's scale words precede its weight words in the region: hold two passes of them
    axis_fifo #(.W(SBYTES*8), .DEPTH(SFIFO)) u_scale_fifo (
        .clk, .rst_n, .s_valid(sw_valid), .s_ready(sw_ready), .s_data(sw_data),
        .m_valid(sf_valid), .m_ready(sf_ready), .m_data(sf_data), .count(unused_sf_count)
    );
    axis_resize #(.IN_BYTES(DB), .OUT_BYTES(WBYTES)) u_weight_words (
        .clk, .rst_n, .s_valid(wt_valid), .s_ready(wt_ready), .s_data(wt_data), .s_keep(wt_keep),
        .m_valid(ww_valid), .m_ready(ww_ready), .m_data(ww_data)
    );
    assign ss_valid = sf_valid;
    assign sf_ready = ss_ready;

    // ---- the array ---------------------------------------------------------------------------------
    spmac_core #(.P(P), .N(N), .M(M), .G(G), .WB(WB), .AB(AB), .PSW(PSW), .GACCW(GACCW), .SCW(SCW), .SPW(SPW),
                 .TOTW(TOTW), .SHW(SHW), .OUTW(OUTW), .BPG(BPG), .BPR_MAX(BPR_MAX), .TOK_W(TOK_W),
                 .PASS_W(PASS_W), .BPR_W(BPR_W)) u_core (
        .clk, .rst_n,
        .s_cfg_valid(cq_valid), .s_cfg_ready(cq_take), .s_cfg_last(cq_data[CORE_CFG-1]),
        .s_cfg_tokens(cq_data[PASS_W+BPR_W+SHW +: TOK_W]), .s_cfg_passes(cq_data[BPR_W+SHW +: PASS_W]),
        .s_cfg_bpr(cq_data[SHW +: BPR_W]), .s_cfg_shift(cq_data[0 +: SHW]),
        .s_w_valid(ww_valid), .s_w_ready(ww_ready), .s_w_data(ww_data[WW-1:0]),
        .s_s_valid(ss_valid), .s_s_ready(ss_ready), .s_s_data(sf_data[SW-1:0]),
        .s_axis_tvalid, .s_axis_tready, .s_axis_tdata, .s_axis_tlast,
        .m_axis_tvalid, .m_axis_tready, .m_axis_tdata, .m_axis_tlast,
        .done, .err_tlast
    );

    assign err = {err_desc, err_tlast, rd_err[1], rd_err[0]};
    // the package's default images belong to spmac_array; this system reads every layer from DRAM
    localparam int unused_default_images = $bits(spmac_pkg::WEIGHT_FILE) + $bits(spmac_pkg::SCALE_FILE);
    wire logic unused = ^{rd_last, fetch_busy, ww_data, sf_data};
endmodule

`default_nettype wire
